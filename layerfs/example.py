"""``layerfs example``: a container's life in miniature, with no network.

Builds a tiny root filesystem from Debian's busybox-static (``/bin/busybox``) as three layers, the
way images arrive: a base layer, an update in OCI form (``.wh.`` whiteout, ``.wh..wh..opq`` opaque
directory) and a config layer in overlay form (0/0 character-device whiteout). Mounts them under an
empty upper layer with layerfs (daemonized, exactly as ``layerfs -o ... MNT`` does), runs a shell in
the merged tree as ``layerfs run`` does (PID 1 in its own namespaces, after pivot_root), unmounts, and
prints the container's changes as ``docker diff`` would. Needs root (mounts and namespaces).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from . import mount, options, shim
from .core import whiteout
from .core.changes import changes
from .errors import LayerfsError

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "echo", "rm", "mkdir", "rmdir", "mv", "cp", "ln", "touch", "sed", "grep",
           "head", "wc", "id", "env", "printf", "find", "sort", "uname", "hostname", "chmod", "true")

# What the container does; the test checks the printed diff against these.
NEW_FILE = "/root/hello.txt"
EDITED_FILE = "/etc/app.conf"
DELETED_FILE = "/opt/app/run.sh"
SCRIPT = "\n".join([
    "cat /etc/motd",
    "ls /opt/app /var/cache/app",
    f"echo 'hello from the container' > {NEW_FILE}",
    f"sed -i s/green/red/ {EDITED_FILE}",
    f"rm {DELETED_FILE}",
    f"cat {EDITED_FILE}",
])

# A --dir holding this file is ours to clear when the example runs there again.
_STAMP = ".layerfs-example"


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _base_layer(root: Path) -> list[tuple[str, str]]:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    _write(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    _write(root, "/etc/group", "root:x:0:\nnogroup:x:65534:\n")
    _write(root, "/etc/hostname", "layerfs-example\n")
    _write(root, "/etc/motd", "base image, version 1\n")
    _write(root, "/opt/app/run.sh", "#!/bin/sh\necho running\n", 0o755)
    _write(root, "/opt/app/legacy.txt", "to be removed by the update\n")
    _write(root, "/var/cache/app/stale-1", "old cache\n")
    _write(root, "/var/cache/app/stale-2", "old cache\n")
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "root").mkdir(mode=0o700)
    for mount_point in ("proc", "dev", "sys"):  # as images have them: where the runtime mounts its own
        (root / mount_point).mkdir()
    return [(f"busybox + {len(APPLETS)} applets, /etc (passwd, group, hostname, motd), /opt/app, /var/cache/app",
             "")]


def _update_layer(root: Path) -> list[tuple[str, str]]:
    """OCI form, as image layer tars carry changes."""
    _write(root, "/etc/motd", "base image, version 2\n")
    (root / "opt/app").mkdir(parents=True)
    (root / "opt/app" / whiteout.oci_whiteout_name("legacy.txt")).touch()
    cache = root / "var/cache/app"
    cache.mkdir(parents=True)
    (cache / whiteout.OPAQUE_MARKER).touch()
    (cache / "index").write_text("fresh cache\n")
    (cache / "draft").write_text("not for release\n")
    return [("changes /etc/motd", ""),
            ("deletes /opt/app/legacy.txt", f"an empty {whiteout.oci_whiteout_name('legacy.txt')} file"),
            ("replaces /var/cache/app", f"{whiteout.OPAQUE_MARKER}, new files index and draft")]


def _config_layer(root: Path) -> list[tuple[str, str]]:
    """Overlay form, as kernel overlayfs and layerfs write an upper layer."""
    _write(root, EDITED_FILE, "color=green\n")
    (root / "var/cache/app").mkdir(parents=True)
    whiteout.make_whiteout(str(root / "var/cache/app/draft"))
    return [(f"adds {EDITED_FILE}", ""), ("deletes /var/cache/app/draft", "a 0/0 character device")]


def _is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _unmount(mountpoint: Path) -> None:
    try:
        mount.umount(str(mountpoint))
    except LayerfsError:
        # Busy (a process left inside?): detach it now; the daemon ends when the last file is closed.
        mount.umount(str(mountpoint), lazy=True)
        raise


def _prepare(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="layerfs-example-"))
    base = Path(directory).absolute()
    base.mkdir(parents=True, exist_ok=True)
    if (base / _STAMP).exists():
        if _is_mounted(base / "rootfs"):
            raise LayerfsError(f"{base}/rootfs is still mounted (layerfs umount it first)")
        for child in base.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif any(base.iterdir()):
        raise LayerfsError(f"--dir {directory}: not empty and not made by layerfs example")
    (base / _STAMP).touch()
    return base


def _show(title: str, lines: list[str]) -> None:
    print(title)
    for line in lines:
        print("  " + line)
    print()


def _run(base: Path) -> int:
    builders = (("1-base", _base_layer), ("2-update", _update_layer), ("3-config", _config_layer))
    layers: list[Path] = []
    print(f"layerfs example in {base}\n")
    print("Layers, bottom first:")
    for name, build in builders:
        layer = base / "layers" / name
        for i, (what, how) in enumerate(build(layer)):
            print(f"  {name if i == 0 else '':9} {what:30} {f'({how})' if how else ''}".rstrip())
        layers.append(layer)
    print()

    upper, work, rootfs = base / "upper", base / "work", base / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir()
    lowers = layers[::-1]  # overlay order: top first
    config = options.parse([options.for_dirs(lowers, upper, work)], str(rootfs))
    sys.stdout.flush()  # the daemon is forked from this process
    mount.mount(config)
    # Each command is echoed before it runs, so the output reads as a terminal session.
    transcript = "\n".join(f"echo {shlex.quote('$ ' + line)}; {line}" for line in SCRIPT.splitlines())
    try:
        print(f"Mounted at {rootfs} (upper layer: {upper})\n")
        made = shim.make_mount_points(str(rootfs))
        process = shim.Process(["/bin/sh", "-c", transcript], {"PATH": "/bin", "HOME": "/root"},
                               hostname="layerfs-example")
        code, output = _captured(lambda: shim.run(str(rootfs), process))
    finally:
        _unmount(rootfs)
    if code:
        output.append(f"(exit status {code})")
    _show("In the container (layerfs run: /bin/sh as PID 1 in its own namespaces):", output)
    found = changes(str(upper), [str(p) for p in lowers], ignore=frozenset(made))
    _show("Unmounted. The container's changes, as docker diff lists them:", [str(c) for c in found] or ["(none)"])
    return 1 if code else 0


def _captured(action) -> tuple[int, list[str]]:
    """``action()``'s result, and the non-empty lines it (and its children) wrote to stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            result = action()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        lines = out.read().decode(errors="replace").splitlines()
    return result, [line for line in lines if line.strip()]


def main(directory: str | None = None) -> int:
    """Run the example in ``directory`` (kept) or in a temporary directory (removed); exit code."""
    if os.geteuid() != 0:
        raise LayerfsError("the example needs root: it mounts with allow_other and makes namespaces")
    if not os.path.exists(BUSYBOX):
        raise LayerfsError(f"{BUSYBOX} not found: install busybox-static (tools/setup does)")
    base = _prepare(directory)
    try:
        return _run(base)
    finally:
        if directory is None:
            if _is_mounted(base / "rootfs"):
                print(f"layerfs: {base}/rootfs is still mounted; left {base} in place", file=sys.stderr)
            else:
                shutil.rmtree(base)
                print(f"Removed {base}.")
        else:
            print(f"Kept {base} (layers/, upper/, work/, rootfs/).")
