"""Rootless Podman, run by a throwaway user with its own subordinate ids, with layerfs as containers-storage's
``mount_program`` and, side by side, with fuse-overlayfs: the same scenario as ``test_podman.py`` (import,
a container that adds, changes, deletes and renames, ``podman diff``, commit, the commit run) must give the
same output, the same diff and the same committed image from both.

Podman starts the mount program inside its user namespace, where layerfs is root of the namespace: it
mounts by mount(2) and writes the ``user.overlay.*`` forms (it finds ``trusted.*`` refused). Rootless
Podman reads ``$XDG_CONFIG_HOME/containers/`` (it ignores ``CONTAINERS_STORAGE_CONF``) and needs its own
``XDG_RUNTIME_DIR``, mode 0700.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import User, give_subordinate_ids
from test_podman import CONTAINER, EXPECTED_DIFF, EXPECTED_OUTPUT, IMAGE, Podman, scenario
from test_podman import rootfs_tar as rootfs_tar  # (the fixture)

from layerfs.core import whiteout

pytestmark = pytest.mark.root


class RootlessPodman(Podman):
    """``podman`` run by ``user``, with a storage, a runtime directory and configuration of its own."""

    def __init__(self, base: Path, program: str, user: User) -> None:
        super().__init__(base, program)
        config = base / "config/containers"
        config.mkdir(parents=True)
        for name in ("storage.conf", "containers.conf"):
            (base / name).rename(config / name)
        os.chmod(base / "run", 0o700)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
        self.user = user
        self.env = {
            **user.env,
            "HOME": str(base),
            "XDG_CONFIG_HOME": str(base / "config"),
            "XDG_RUNTIME_DIR": str(base / "run"),
        }

    def __call__(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        return self.run_tool("podman", *args, check=check)

    def run_tool(self, tool: str, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        """``tool ARGS`` (podman, buildah) as the user, with this storage."""
        command = ["runuser", "-u", self.user.name, "--", "env", *(f"{k}={v}" for k, v in self.env.items())]
        result = subprocess.run(
            [*command, tool, *map(str, args)], cwd=self.base, capture_output=True, text=True, timeout=180
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
        return result


@pytest.fixture
def rootless_podmans(plain_user: User) -> Iterator:
    """Rootless Podmans of ``plain_user``. Short paths, as in test_podman (Podman 4.3 misses a container's
    exit with long ones); everything removed afterwards, the user's processes (Podman's pause process,
    which holds the mounts in its namespace) ended by the user fixture."""
    give_subordinate_ids(plain_user)
    made: list[RootlessPodman] = []

    def make(program: str) -> RootlessPodman:
        base = Path(tempfile.mkdtemp(prefix="lfsrl-"))
        base.chmod(0o755)
        made.append(RootlessPodman(base, program, plain_user))
        return made[-1]

    try:
        yield make
    finally:
        for podman in made:
            podman("rm", "--all", "--force", "--time", "0", check=False)
            podman("rmi", "--all", "--force", check=False)
        for podman in made:
            podman("system", "reset", "--force", check=False)  # (ends the pause process: the mounts go with it)
            shutil.rmtree(podman.base, ignore_errors=True)


@pytest.fixture
def shared(plain_user: User, rootfs_tar: Path) -> Iterator[Path]:
    """What both Podmans use, where the user can read it: the rootfs tar, a ``layerfs`` the user can run
    and a build context (a Dockerfile of several steps, and a file it copies in)."""
    base = Path(tempfile.mkdtemp(prefix="lfsrl-shared-"))
    try:
        base.chmod(0o755)
        shutil.copy(rootfs_tar, base / "rootfs.tar")
        plain_user.layerfs_program(base / "layerfs")
        (base / "context").mkdir()
        (base / "context/note").write_text("copied in\n")
        (base / "context/Dockerfile").write_text(DOCKERFILE)
        for path in (base / "rootfs.tar", base / "context/note", base / "context/Dockerfile"):
            path.chmod(0o644)
        yield base
    finally:
        shutil.rmtree(base)


DOCKERFILE = f"""FROM {IMAGE}
RUN echo one > /root/one && rm /etc/obsolete
RUN rm -r /srv/data && mkdir /srv/data && echo two > /srv/data/two
RUN mv /usr/share/doc /usr/share/moved && sed -i s/v1/v3/ /etc/motd
COPY note /etc/note
RUN cat /etc/note /etc/motd /srv/data/two /usr/share/moved/pkg/copyright
"""
BUILD_OUTPUT = "copied in\nv3\ntwo\nin a directory renamed (by redirect on layerfs)\n"


def _both(rootless_podmans, shared: Path) -> dict[str, RootlessPodman]:
    return {
        "fuse-overlayfs": rootless_podmans(shutil.which("fuse-overlayfs") or "fuse-overlayfs"),
        "layerfs": rootless_podmans(str(shared / "layerfs")),
    }


def _upper_entries(podman: RootlessPodman, container: str) -> tuple[Path, dict[str, tuple]]:
    """The container's upper layer, and each entry's kind and owner there (whiteouts as such;
    fuse-overlayfs's marker files, and what it copied up of a renamed directory, left out)."""
    upper = Path(podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", container).stdout.strip())
    entries = {}
    for path in upper.rglob("*"):
        rel = path.relative_to(upper)
        if whiteout.is_marker_name(rel.name) or rel.parts[:3] == ("usr", "share", "moved") and len(rel.parts) > 3:
            continue
        st = os.lstat(path)
        kind = "whiteout" if whiteout.is_whiteout_stat(st) else stat.S_IFMT(st.st_mode)
        entries[str(rel)] = (kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return upper, entries


def _upper(podman: RootlessPodman) -> tuple[dict[str, tuple], bool]:
    """The scenario container's upper entries, and whether /srv/data, replaced, is opaque."""
    upper, entries = _upper_entries(podman, CONTAINER)
    return entries, whiteout.is_opaque_dir(str(upper / "srv/data"))


def _image_tree(podman: RootlessPodman, image: str) -> dict[str, tuple]:
    """The tree of ``image`` as ``podman export`` of a container of it gives it: path -> type, mode,
    owner, size, link target, content hash."""
    name = f"tree-{image.rsplit('/', 1)[-1].replace(':', '-')}"
    podman("create", "--name", name, image, "true")
    podman("export", "-o", podman.base / f"{name}.tar", name)
    tree = {}
    with tarfile.open(podman.base / f"{name}.tar") as tar:
        for m in tar:
            data = tar.extractfile(m) if m.isfile() else None
            digest = hashlib.sha256(data.read()).hexdigest() if data else None
            tree[m.name] = (m.type, m.mode, m.uid, m.gid, m.size, m.linkname, digest)
    return tree


def test_rootless_podman_with_layerfs_as_with_fuse_overlayfs(rootless_podmans, shared):
    podmans = _both(rootless_podmans, shared)
    results = {name: scenario(podman, shared / "rootfs.tar") for name, podman in podmans.items()}
    assert results["layerfs"] == results["fuse-overlayfs"]
    assert results["layerfs"]["output"] == EXPECTED_OUTPUT
    assert results["layerfs"]["diff"] == sorted(EXPECTED_DIFF)
    # layerfs wrote the container's upper: the renamed directory is a redirect, in the user form.
    redirects = [
        path
        for path in (podmans["layerfs"].base / "graph/overlay").glob("*/diff/usr/share/*")
        if "user.overlay.redirect" in os.listxattr(path, follow_symlinks=False)
    ]
    assert [path.name for path in redirects] == ["moved"]
    # The upper layers: the same entries, owners and whiteouts, the replaced directory opaque in both.
    assert _upper(podmans["layerfs"]) == _upper(podmans["fuse-overlayfs"])
    assert _upper(podmans["layerfs"])[1]
    # The committed images: the same trees.
    committed = {name: _image_tree(podman, "localhost/box:2") for name, podman in podmans.items()}
    assert committed["layerfs"] == committed["fuse-overlayfs"]


def test_rootless_podman_build_and_buildah_bud_with_layerfs_as_with_fuse_overlayfs(rootless_podmans, shared):
    """A Dockerfile of several steps (deletes, a replaced directory, a rename, a COPY) built by
    ``podman build`` and by ``buildah bud`` on each storage: the same output and the same image trees."""
    podmans = _both(rootless_podmans, shared)
    seen = {}
    for name, podman in podmans.items():
        podman("import", shared / "rootfs.tar", IMAGE)
        built = podman("build", "--network", "none", "-t", "localhost/built:1", shared / "context")
        bud = podman.run_tool("buildah", "bud", "--network", "none", "-t", "localhost/built:2", shared / "context")
        assert BUILD_OUTPUT in built.stdout and BUILD_OUTPUT in bud.stdout, name
        seen[name] = {
            "podman build": _image_tree(podman, "localhost/built:1"),
            "buildah bud": _image_tree(podman, "localhost/built:2"),
        }
        assert seen[name]["podman build"] == seen[name]["buildah bud"], name
    assert seen["layerfs"] == seen["fuse-overlayfs"]


def test_rootless_podman_uidmap_with_layerfs_as_with_fuse_overlayfs(rootless_podmans, shared):
    """``--uidmap``/``--gidmap``: containers-storage passes them to the mount program as uidmapping= and
    gidmapping=; what the container sees and what lands in the upper must be the same on both."""
    podmans = _both(rootless_podmans, shared)
    seen = {}
    for name, podman in podmans.items():
        podman("import", shared / "rootfs.tar", IMAGE)
        ran = podman(
            "run",
            "--name",
            "mapped",
            "--uidmap",
            "0:1:5000",
            "--gidmap",
            "0:1:5000",
            IMAGE,
            "sh",
            "-c",
            "touch /root/mine; mkdir /srv/new; echo x > /etc/motd; ls -lnd /etc/motd /root/mine /srv/new /bin/busybox",
        )
        # (ls's columns but the time: the two runs may fall in different minutes)
        listed = [line.split()[:5] + line.split()[8:] for line in ran.stdout.splitlines()]
        seen[name] = (listed, _upper_entries(podman, "mapped")[1])
    assert seen["layerfs"] == seen["fuse-overlayfs"]
    # What container root writes is stored as the layers' owner, the user: uidmapping did its part.
    assert {owner for _, owner, _, _ in seen["layerfs"][1].values()} == {podmans["layerfs"].user.uid}
