"""Busybox images made at test time, without a network: a root tree of the static busybox and the tools a
test names, made the one layer of an OCI image layout with umoci."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
ROOT_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"


def umoci(*args: str | os.PathLike) -> None:
    result = subprocess.run(["umoci", *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"umoci {args} failed: {result.stderr}"


def busybox_tree(
    root: Path, tools: Iterable[str], *, dirs: Iterable[str] = (), passwd: str = ROOT_PASSWD, group: str | None = None
) -> Path:
    """``root`` made: /bin/busybox and a link to it for each of ``tools``, /etc/passwd (and /etc/group), /tmp,
    /root and ``dirs``."""
    for d in ("bin", "etc", "tmp", "root", *dirs):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for tool in tools:
        os.symlink("busybox", root / "bin" / tool)
    (root / "etc/passwd").write_text(passwd)
    if group is not None:
        (root / "etc/group").write_text(group)
    return root


def one_layer_layout(base: Path, root: Path, tag: str) -> Path:
    """An OCI layout ``base/layout`` whose image ``tag`` has ``root`` as its one layer. (The layer is tarred
    here: umoci insert's own tar lacks its end blocks.)"""
    layout = base / "layout"
    umoci("init", "--layout", layout)
    umoci("new", "--image", f"{layout}:{tag}")
    with tarfile.open(base / "layer.tar", "w") as tar:
        tar.add(root, arcname=".")
    umoci("raw", "add-layer", "--image", f"{layout}:{tag}", base / "layer.tar")
    return layout
