"""``layerfs example``: a container's life in miniature, with no network, through the command line.

Builds a tiny image from Debian's busybox-static (``/bin/busybox``) in three layers, the way images
arrive (a base, an update that deletes a file and replaces a directory, a config layer), and writes it
as an OCI image layout. Then, as a person would type them, the ``layerfs`` commands that import it into a
store, run its command in a container (PID 1 in its own namespaces, after pivot_root into the layerfs
mount), list the container's changes as ``docker diff`` would, commit them as a new image, and run that;
then build an image from a Dockerfile over it, twice (the second build from the cache), and run that.
Needs root (mounts and namespaces).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .core import whiteout
from .errors import LayerfsError
from .oci import layout

BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "rm",
    "mkdir",
    "rmdir",
    "mv",
    "cp",
    "ln",
    "touch",
    "sed",
    "grep",
    "head",
    "wc",
    "id",
    "env",
    "printf",
    "find",
    "sort",
    "uname",
    "hostname",
    "chmod",
    "true",
)

# What the container does; the test checks the printed diff against these.
NEW_FILE = "/root/hello.txt"
EDITED_FILE = "/etc/app.conf"
DELETED_FILE = "/opt/app/run.sh"
SCRIPT = "\n".join(
    [
        "cat /etc/motd",
        "ls /opt/app /var/cache/app",
        f"echo 'hello from the container' > {NEW_FILE}",
        f"sed -i s/green/red/ {EDITED_FILE}",
        f"rm {DELETED_FILE}",
        f"cat {EDITED_FILE}",
    ]
)
DEMO = "/usr/bin/demo"  # the image's Cmd: SCRIPT, each command echoed before it runs, as on a terminal
IMAGE, COMMITTED, CONTAINER = "example:1", "example:2", "demo"
BUILT = "example:3"  # built from DOCKERFILE over the committed image, twice: the second time from the cache
DOCKERFILE = f"""\
FROM {COMMITTED}
COPY greeting.txt /srv/
RUN wc -c /srv/greeting.txt > /srv/size
WORKDIR /srv
CMD ["cat", "greeting.txt", "size"]
"""

# A --dir holding this file is ours to clear when the example runs there again.
_STAMP = ".layerfs-example"


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _base_layer(root: Path) -> list[str]:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    transcript = "".join(f"echo {shlex.quote('$ ' + line)}; {line}\n" for line in SCRIPT.splitlines())
    _write(root, DEMO, "#!/bin/sh\nset -e\n" + transcript, 0o755)
    _write(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    _write(root, "/etc/group", "root:x:0:\nnogroup:x:65534:\n")
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
    return [f"busybox + {len(APPLETS)} applets, {DEMO}, /etc (passwd, group, motd), /opt/app, /var/cache/app"]


def _update_layer(root: Path) -> list[str]:
    """Built in OCI form (``.wh.`` files), as a layer tar carries changes."""
    _write(root, "/etc/motd", "base image, version 2\n")
    (root / "opt/app").mkdir(parents=True)
    (root / "opt/app" / whiteout.oci_whiteout_name("legacy.txt")).touch()
    cache = root / "var/cache/app"
    cache.mkdir(parents=True)
    (cache / whiteout.OPAQUE_MARKER).touch()
    (cache / "index").write_text("fresh cache\n")
    (cache / "draft").write_text("not for release\n")
    return ["changes /etc/motd", "deletes /opt/app/legacy.txt", "replaces /var/cache/app: new files index and draft"]


def _config_layer(root: Path) -> list[str]:
    """Built in overlay form (a 0/0 character device whiteout), as an upper layer holds changes."""
    _write(root, EDITED_FILE, "color=green\n")
    (root / "var/cache/app").mkdir(parents=True)
    whiteout.make_whiteout(str(root / "var/cache/app/draft"))
    return [f"adds {EDITED_FILE}", "deletes /var/cache/app/draft"]


def _build_image(base: Path) -> Path:
    """The example image as an OCI image layout, tagged 1; its layers are built as directories first."""
    builders = (("1-base", _base_layer), ("2-update", _update_layer), ("3-config", _config_layer))
    print("The built-in image's layers, bottom first:")
    layers = []
    for name, build in builders:
        layer = base / "build" / name
        for i, what in enumerate(build(layer)):
            print(f"  {name if i == 0 else '':9} {what}")
        layers.append(str(layer))
    config = {
        "architecture": _ARCHITECTURES.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": [DEMO], "WorkingDir": "/root"},
    }
    image = base / "image"
    layout.write_image(str(image), "1", layers, config)
    shutil.rmtree(base / "build")
    print(f"written as an OCI image layout (gzip layer tars, .wh. whiteouts) to {image}\n")
    return image


_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}  # uname's names to OCI's (GOARCH)


def mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(f"{base}/")]


def _prepare(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="layerfs-example-"))
    base = Path(directory).absolute()
    base.mkdir(parents=True, exist_ok=True)
    if (base / _STAMP).exists():
        if mounts_under(base):
            raise LayerfsError(f"{mounts_under(base)[0]} is still mounted (layerfs umount it first)")
        for child in base.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    elif any(base.iterdir()):
        raise LayerfsError(f"--dir {directory}: not empty and not made by layerfs example")
    (base / _STAMP).touch()
    return base


def _build_context(base: Path) -> Path:
    """A build context: DOCKERFILE and the file it copies; shown as a person would look at it."""
    context = base / "app"
    _write(context, "Dockerfile", DOCKERFILE)
    _write(context, "greeting.txt", "hello from a layerfs build\n")
    print(f"$ cat {context}/Dockerfile")
    print("".join(f"  {line}\n" for line in DOCKERFILE.splitlines()))
    return context


def _layerfs(*words: str, store: Path, note: str = "") -> int:
    """Run ``layerfs WORDS`` (this installation's, on ``store``) as a person would, echoing the command and
    indenting its output; its exit code."""
    print(f"$ layerfs {shlex.join(words)}" + (f"    # {note}" if note else ""))
    sys.stdout.flush()
    result = subprocess.run(
        [sys.executable, "-m", "layerfs", *words],
        env={**os.environ, "LAYERFS_ROOT": str(store)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    for line in result.stdout.splitlines():
        print("  " + line)
    if result.returncode:
        print(f"  (exit status {result.returncode})")
    print()
    return result.returncode


def _run(base: Path) -> int:
    print(f"layerfs example in {base}\n")
    image = _build_image(base)
    store = base / "store"
    print(f"$ export LAYERFS_ROOT={shlex.quote(str(store))}    # the store: images, layers, containers\n")
    steps = [
        (("import", f"oci:{image}:1", IMAGE), ""),
        (("run", "--name", CONTAINER, IMAGE), f"the image's command, {DEMO}, as PID 1 after pivot_root"),
        (("diff", CONTAINER), "what the container changed, as docker diff lists it"),
        (("commit", CONTAINER, COMMITTED), "its changes as a new layer on top of the image's"),
        (("run", "--rm", COMMITTED, "cat", NEW_FILE, EDITED_FILE), "the new image has them"),
        (("images",), ""),
    ]
    if not _typed(steps, store):
        return 1
    context = _build_context(base)
    steps = [
        (("build", "-t", BUILT, str(context)), "an image from a Dockerfile: a layer per COPY and RUN"),
        (("build", "-t", BUILT, str(context)), "again: every step from the cache, the same image id"),
        (("run", "--rm", BUILT), ""),
    ]
    return 0 if _typed(steps, store) else 1


def _typed(steps: list[tuple[tuple[str, ...], str]], store: Path) -> bool:
    """Each command run in turn, until one fails; whether all succeeded."""
    return all(_layerfs(*words, store=store, note=note) == 0 for words, note in steps)


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
        left = mounts_under(base)
        if left:
            print(f"layerfs: {left[0]} is still mounted; left {base} in place", file=sys.stderr)
        elif directory is None:
            shutil.rmtree(base)
            print(f"Removed {base}.")
        else:
            print(f"Kept {base} (image/: the OCI image; store/: its store, with container {CONTAINER}).")
