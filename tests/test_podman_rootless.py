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

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import User
from test_podman import EXPECTED_DIFF, EXPECTED_OUTPUT, Podman, scenario
from test_podman import rootfs_tar as rootfs_tar  # (the fixture)

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
        command = ["runuser", "-u", self.user.name, "--", "env", *(f"{k}={v}" for k, v in self.env.items())]
        result = subprocess.run(
            [*command, "podman", *map(str, args)], cwd=self.base, capture_output=True, text=True, timeout=180
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
        return result


@pytest.fixture
def rootless_podmans(plain_user: User) -> Iterator:
    """Rootless Podmans of ``plain_user``. Short paths, as in test_podman (Podman 4.3 misses a container's
    exit with long ones); everything removed afterwards, the user's processes (Podman's pause process,
    which holds the mounts in its namespace) ended by the user fixture."""
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


def test_rootless_podman_with_layerfs_as_with_fuse_overlayfs(plain_user, rootless_podmans, rootfs_tar):
    shared = Path(tempfile.mkdtemp(prefix="lfsrl-tar-"))
    try:
        shared.chmod(0o755)
        tar = Path(shutil.copy(rootfs_tar, shared / "rootfs.tar"))
        tar.chmod(0o644)
        podmans = {
            "fuse-overlayfs": rootless_podmans(shutil.which("fuse-overlayfs") or "fuse-overlayfs"),
            "layerfs": rootless_podmans(str(plain_user.layerfs_program(shared / "layerfs"))),
        }
        results = {name: scenario(podman, tar) for name, podman in podmans.items()}
    finally:
        shutil.rmtree(shared)
    assert results["layerfs"] == results["fuse-overlayfs"]
    # layerfs wrote the container's upper: the renamed directory is a redirect, in the user form.
    redirects = [
        path
        for path in (podmans["layerfs"].base / "graph/overlay").glob("*/diff/usr/share/*")
        if "user.overlay.redirect" in os.listxattr(path, follow_symlinks=False)
    ]
    assert [path.name for path in redirects] == ["moved"]
    assert results["layerfs"]["output"] == EXPECTED_OUTPUT
    assert results["layerfs"]["diff"] == sorted(EXPECTED_DIFF)
