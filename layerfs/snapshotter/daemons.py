"""The layerfs daemons that serve the snapshotter's union snapshots, started by the snapshotter itself.

containerd is handed a bind mount of a mount that is already there, so that neither ``ctr`` (which mounts a
new container's root to read its /etc/group) nor the shim (which mounts it as the rootfs) starts a daemon
of its own through mount.fuse3: no interpreter starts on a container's way up, and no mount helper meets
the shim's child reaper (containerd #4387, a failed run under load).

Daemons are started by a mounter: a process of its own (``python -m layerfs.snapshotter.daemons``, no
gRPC in it), started with the snapshotter, which has imported the filesystem once, so a snapshot's daemon
starts in a fork, not a new interpreter. Each daemon is fs.mount's, in a session of its own: it outlives
the mounter and the snapshotter, so a snapshotter killed or restarted takes no container's root with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

from ..errors import LayerfsError
from ..fs import mount, mounts

_END_S = 5  # the mounter's end, once told: it may still be starting


class Mounter:
    """The mounter, asked one thing at a time (the snapshotter's lock); it ends with the snapshotter."""

    def __init__(self) -> None:
        self._process = self._start()

    @staticmethod
    def _start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )

    def mount(self, options: str, mountpoint: str) -> None:
        """Mount layerfs with ``options`` (fuse-overlayfs's -o form) at ``mountpoint``; returns once the
        daemon serves it."""
        if self._process.poll() is not None:  # (killed: another takes its place)
            self._process = self._start()
        assert self._process.stdin is not None and self._process.stdout is not None
        try:
            self._process.stdin.write(json.dumps([options, mountpoint]).encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # (said below)
        reply = self._process.stdout.readline()
        if not reply:
            raise LayerfsError("the snapshotter's mounter has ended")
        error = json.loads(reply)
        if error:
            raise LayerfsError(error)

    def close(self) -> None:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.close()  # (its end of file ends the mounter)
        self._process.stdout.close()
        try:
            self._process.wait(timeout=_END_S)
        except subprocess.TimeoutExpired:
            self._process.kill()  # (it has no daemon to wait for: those are their own)
            self._process.wait()


def _serve_requests() -> None:
    from ..fs import options

    for line in sys.stdin.buffer:
        _reap_daemons()
        mount_options, mountpoint = json.loads(line)
        try:
            mount.mount(options.parse([mount_options], mountpoint))
            error = ""
        except (LayerfsError, OSError) as e:
            error = str(e)
        sys.stdout.buffer.write(json.dumps(error).encode() + b"\n")
        sys.stdout.buffer.flush()


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
    with contextlib.suppress(LayerfsError):  # (not a mount, or not any more)
        mount.umount(mountpoint, lazy=True)
    return daemon is None or mounts.wait_for_exit(daemon.pid, timeout)


if __name__ == "__main__":
    _serve_requests()
