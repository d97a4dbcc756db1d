"""The layerfs daemons that serve the snapshotter's union snapshots, started by the snapshotter itself.

containerd is handed a bind mount of a mount that is already there, so that neither ``ctr`` (which mounts a
new container's root to read its /etc/group) nor the shim (which mounts it as the rootfs) starts a daemon
of its own through mount.fuse3: no interpreter starts on a container's way up, and no mount helper meets
the shim's child reaper (containerd #4387, a failed run under load).

Daemons are started by a mounter: a process forked from the snapshotter before its gRPC threads are there
(a process with threads forks badly), which has imported the filesystem once, so a snapshot's daemon starts
in a fork, not a new interpreter. Each daemon is fs.mount's, in a session of its own: it outlives the
mounter and the snapshotter, so a snapshotter killed or restarted takes no container's root with it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import socket

from .. import syscalls
from ..errors import LayerfsError
from ..fs import mounts


class Mounter:
    """A forked process that mounts on request; one request at a time (the snapshotter's lock)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            code = 1
            try:
                _serve_requests(theirs)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._pid = pid
        self._socket = ours
        self._replies = ours.makefile("rb")

    def mount(self, options: str, mountpoint: str) -> None:
        """Mount layerfs with ``options`` (fuse-overlayfs's -o form) at ``mountpoint``; returns once the
        daemon serves it."""
        self._socket.sendall(json.dumps([options, mountpoint]).encode() + b"\n")
        reply = self._replies.readline()
        if not reply:
            raise LayerfsError("the snapshotter's mounter has ended")
        error = json.loads(reply)
        if error:
            raise LayerfsError(error)

    def close(self) -> None:
        self._replies.close()
        self._socket.close()  # (its end of file ends the mounter)
        os.waitpid(self._pid, 0)


def _serve_requests(requests: socket.socket) -> None:
    # Nothing of the snapshotter's is the daemons' business, its root's lock least of all.
    keep = sorted({0, 1, 2, requests.fileno()})
    for low, high in itertools.pairwise([*keep, os.sysconf("SC_OPEN_MAX")]):
        os.closerange(low + 1, high)
    from ..fs import mount, options

    with requests, requests.makefile("rb") as lines:
        for line in lines:
            _reap_daemons()
            mount_options, mountpoint = json.loads(line)
            try:
                mount.mount(options.parse([mount_options], mountpoint))
                error = ""
            except (LayerfsError, OSError) as e:
                error = str(e)
            requests.sendall(json.dumps(error).encode() + b"\n")


def _reap_daemons() -> None:
    """The daemons are the mounter's children: those that have ended are waited for."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def serving(mountpoint: str) -> bool:
    """Whether a live layerfs daemon serves ``mountpoint`` (its record, and the mount there)."""
    return mounts.find(mountpoint) is not None and os.path.ismount(mountpoint)


def stop(mountpoint: str, timeout: float) -> bool:
    """Detach ``mountpoint`` (gone at once for new users; the daemon ends when the last one has) and wait
    up to ``timeout`` seconds for its daemon to end; whether it has. A dead mount is detached too."""
    daemon = mounts.find(mountpoint)
    try:
        syscalls.umount(mountpoint, lazy=True)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):  # not a mount (any more)
            raise
    return daemon is None or mounts.wait_for_exit(daemon.pid, timeout)
