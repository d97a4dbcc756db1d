"""The rootless comparison (issue 20's proof), as root: ``.venv/bin/python -m benchmarks.rootless``.

    python -m benchmarks.rootless                  both parts, 5 interleaved repetitions
    python -m benchmarks.rootless --quick          1 repetition, the file workloads' smaller counts
    python -m benchmarks.rootless --only podman    one part: podman or files

Two parts, side by side in one run, each printed as a table of medians with every implementation's ratio
to kernel overlayfs and to fuse-overlayfs (layerfs ÷ each is layerfs's column):

- podman: rootless Podman run by a throwaway user with subordinate ids of its own, with layerfs and with
  fuse-overlayfs as ``mount_program``, and with Podman's own kernel overlayfs (rootless native overlay):
  ``podman run --rm`` of ``true`` in a busybox image (start to exit), and ``podman build`` of podman.py's
  three-step Dockerfile. Each storage has its own ``XDG_CONFIG_HOME`` and ``XDG_RUNTIME_DIR``; /dev/fuse is
  opened to every user for the run, as udev leaves it. The user and everything it made go at the end.
- files: the file workloads of ``tools/bench`` (compare.py) through mounts made in a user namespace that maps
  every id to itself (``unshare -Ur`` with the whole range, so the layers' owners stay as they are): root
  there, with no capability over the machine, so ``trusted.*`` xattrs and passthrough are refused as for
  any rootless mount. Kernel overlayfs is mounted with ``userxattr``; the layers get the ``user.overlay.opaque``
  records beside their ``trusted.*`` ones, which a user namespace cannot read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from layerfs import syscalls

from . import data as data_mod
from . import layers, podman, report, workloads
from .impls import Impl, layerfs_command
from .runner import Results, Runner, Sample
from .util import log, remove_mounted_tree
from .workspace import Workspace

T = TypeVar("T")
PARTS = ("podman", "files")
PODMAN_IMPLS = {"overlay": None, "fuse-overlayfs": shutil.which("fuse-overlayfs"), "layerfs": None}
FILE_IMPLS = [Impl("overlay", "kernel", userns=True), Impl("fuse-overlayfs", "fuse"), Impl("layerfs", "fuse")]
# Not here: podman-build and start (the podman part is rootless Podman itself: a mount in a user namespace is
# nodev, so the chroot's /dev/null cannot be opened; Podman mounts a /dev of its own), and chown-r (its
# metacopy variants).
FILE_WORKLOADS = [w for w in workloads.WORKLOADS if w.name not in ("podman-build", "start", "chown-r")]
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


# -- podman ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A user with 65536 subordinate uids and gids past every range given, and /dev/fuse open to it;
    removed afterwards with whatever it left running (Podman's pause process)."""
    name = f"lfsb-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", name], check=True)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    user = pwd.getpwnam(name)
    try:
        for table, option in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
            ranges = [line.split(":") for line in Path(table).read_text().splitlines() if line.count(":") == 2]
            first = max([100000, *(int(start) + int(count) for _, start, count in ranges)])
            subprocess.run(["usermod", option, f"{first}-{first + 65535}", name], check=True)
        os.chmod("/dev/fuse", 0o666)
        yield user
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        for _ in range(100):  # (one may start another as it is killed)
            if subprocess.run(["pkill", "-KILL", "-U", str(user.pw_uid)]).returncode != 0:
                break
            time.sleep(0.05)
        subprocess.run(["userdel", name], check=True)


class Storage:
    """One rootless Podman of ``user``: its graph, run directory and configuration under ``base``,
    mounting with ``program`` (None: Podman's own kernel overlayfs)."""

    def __init__(self, base: Path, program: str | None, user: pwd.struct_passwd) -> None:
        self.base, self.user = base, user
        podman.write_configs(base, program)
        config = base / "config/containers"
        config.mkdir(parents=True)
        for name in ("storage.conf", "containers.conf"):
            (base / name).rename(config / name)
        (base / "run").chmod(0o700)
        (base / "context").mkdir()
        (base / "context/Dockerfile").write_text(podman.DOCKERFILE)
        (base / "context/small.txt").write_text("a small file\n")
        podman.rootfs_tar(base / "busybox.tar")
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)
        self.env = {
            "PATH": PATH,
            "HOME": str(base),
            "XDG_CONFIG_HOME": str(base / "config"),
            "XDG_RUNTIME_DIR": str(base / "run"),
        }

    def __call__(self, *args: str | os.PathLike) -> float:
        """``podman ARGS`` as the user; the seconds it took."""
        command = ["runuser", "-u", self.user.pw_name, "--", "env", *(f"{k}={v}" for k, v in self.env.items())]
        started = time.perf_counter()
        done = subprocess.run([*command, "podman", *map(str, args)], cwd=self.base, capture_output=True, text=True)
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(map(str, args))}: {done.stderr.strip()[-300:]}")
        return took


def podman_part(reps: int) -> Results:
    """``podman run --rm`` and ``podman build`` as a throwaway user, on each storage in turn, ``reps`` times."""
    program = layerfs_command()
    if not program:
        raise SystemExit("layerfs rootless bench: no .venv/bin/layerfs (tools/setup makes it)")
    results = Results("rootless podman", list(PODMAN_IMPLS), ["podman-run", "podman-build"])
    with throwaway_user() as user:
        probe = subprocess.run(["runuser", "-u", user.pw_name, "--", program[0], "--version"], capture_output=True)
        if probe.returncode != 0:
            raise SystemExit(f"layerfs rootless bench: {program[0]}: other users cannot run it (tools/setup)")
        storages = {}
        try:
            for impl, mount_program in PODMAN_IMPLS.items():
                base = Path(tempfile.mkdtemp(prefix=f"lfsrb-{impl}-"))
                base.chmod(0o755)
                storages[impl] = Storage(base, program[0] if impl == "layerfs" else mount_program, user)
                storages[impl]("import", base / "busybox.tar", podman.IMAGE)
                storages[impl]("run", "--rm", podman.IMAGE, "true")  # (untimed: the first start sets things up)
            for rep in range(reps):
                for impl, run in storages.items():
                    took = run("run", "--rm", podman.IMAGE, "true")
                    results.samples.append(Sample("podman-run", impl, rep, took, 1))
                    took = run("build", "--layers", "--no-cache", "--pull=never", "-t", "built", run.base / "context")
                    results.samples.append(Sample("podman-build", impl, rep, took, podman.STEPS))
                    run("rmi", "built")
                log(f"podman: repetition {rep + 1} of {reps} done")
        finally:
            for run in storages.values():
                with contextlib.suppress(RuntimeError):
                    run("system", "reset", "--force")  # (ends the pause process: the mounts go with it)
            for run in storages.values():
                remove_mounted_tree(run.base)
    return results


# -- files ----------------------------------------------------------------------------------------


def in_user_namespace(work: Callable[[], T]) -> T:
    """``work()`` in a child in a new user and mount namespace that maps every id to itself; its result
    comes back pickled. (The maps are written from here: a process may not map ids beyond its own.)"""
    ready, go, result = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
            os.write(ready[1], b".")
            os.read(go[0], 1)
            with os.fdopen(result[1], "wb") as out:
                pickle.dump(work(), out)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    for fd in (ready[1], go[0], result[1]):
        os.close(fd)
    os.read(ready[0], 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 4294967295\n")
    os.write(go[1], b".")
    with os.fdopen(result[0], "rb") as f:
        answer = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError("the run in the user namespace failed (above)")
    return pickle.loads(answer)


def add_user_opaque_records(lowers: list[Path]) -> None:
    """``user.overlay.opaque`` beside each ``trusted.overlay.opaque``: the form a user namespace reads."""
    for lower in lowers:
        for root, dirs, _ in os.walk(lower):
            for d in dirs:
                if layers.is_opaque(os.path.join(root, d)):
                    os.setxattr(os.path.join(root, d), "user.overlay.opaque", b"y", follow_symlinks=False)


def files_part(scale: workloads.Scale, reps: int, cache: Path) -> Results:
    data = data_mod.ensure(cache, "auto")
    log(f"data: {data_mod.describe(data)}")
    with Workspace(data, native=False, flat=False) as ws:
        add_user_opaque_records(ws.lowers)

        def run() -> Results:
            try:
                return Runner(ws, FILE_IMPLS, FILE_WORKLOADS, scale, reps, views=False).run()
            finally:  # (here, where they were mounted: the namespace ends with this process)
                for m in reversed(list(ws.mounts)):
                    ws.unmount(m)

        return in_user_namespace(run)


# -- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rootless", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one repetition, the file workloads' smaller counts")
    p.add_argument("--reps", type=int, help="repetitions (default: 5, --quick 1)")
    p.add_argument("--only", choices=PARTS, help="one part")
    p.add_argument("--cache", type=Path, default=data_mod.DEFAULT_CACHE, help="where the layers are cached")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("layerfs rootless bench: must run as root (it makes a user, and mounts)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scale = workloads.QUICK if args.quick else workloads.FULL
    reps = args.reps or scale.reps
    load = os.getloadavg()[0]
    started = time.monotonic()
    tables = []
    if args.only in (None, "podman"):
        tables.append(("Rootless Podman (a throwaway user; seconds)", podman_part(reps)))
    if args.only in (None, "files"):
        tables.append(("File workloads, mounted in a user namespace", files_part(scale, reps, args.cache)))
    for title, results in tables:
        print(f"\n{title}, {reps} reps, medians:\n{report.table(results)}")
        for w, by_impl in report.errors(results).items():
            for impl, e in by_impl.items():
                print(f"  error: {w} on {impl}: {e}")
    print(
        f"\nWall time {time.monotonic() - started:.0f}s (load average before {load:.1f}, "
        f"after {os.getloadavg()[0]:.1f})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
