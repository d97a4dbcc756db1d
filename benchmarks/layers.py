"""Overlay-form layer directories read without a mount: the merged view and a flattened copy.

The benchmark layers use only overlay's on-disk forms (0/0 character-device whiteouts and the
``trusted.overlay.opaque`` xattr), so the merged view computed here is what kernel overlayfs shows. It is
used to pick workload targets, to build the one-layer tree that layerfs-over-1-layer mounts (hard links:
no data is copied), and as the reference for "what each implementation sees".
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .util import allocated

OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass
class Node:
    """One merged entry: which layer (index in the top-first list) provides it, and its children."""

    kind: str  # d f l c b p s
    size: int
    layer: int
    children: dict[str, Node] | None = field(default=None, repr=False)


def kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "d"),
        (stat.S_ISREG, "f"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISFIFO, "p"),
    ):
        if test(mode):
            return kind
    return "s"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | os.PathLike) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def make_whiteout(path: str | os.PathLike) -> None:
    """An overlay whiteout: a character device 0/0 with mode 000, as overlayfs writes it."""
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def merged_tree(lowers: list[Path]) -> Node:
    """The merged tree of ``lowers`` (top first) by overlayfs's rules, applied from the bottom up."""
    root = Node("d", 0, len(lowers) - 1, {})
    for index in reversed(range(len(lowers))):
        root.layer = index
        _apply(str(lowers[index]), index, root)
    return root


def _apply(directory: str, index: int, node: Node) -> None:
    assert node.children is not None
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        st = e.stat(follow_symlinks=False)
        if is_whiteout(st):
            node.children.pop(e.name, None)
            continue
        kind = kind_of(st.st_mode)
        if kind != "d":
            node.children[e.name] = Node(kind, st.st_size, index)
            continue
        below = node.children.get(e.name)
        if below is None or below.kind != "d" or is_opaque(e.path):
            below = Node("d", 0, index, {})
            node.children[e.name] = below
        below.layer = index
        _apply(e.path, index, below)


def flat_view(tree: Node) -> dict[str, tuple[str, int, int]]:
    """relative path -> (kind, size, layer index) for every entry below the root."""
    out: dict[str, tuple[str, int, int]] = {}
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for name, child in (node.children or {}).items():
            rel = prefix + name
            out[rel] = (child.kind, child.size if child.kind == "f" else 0, child.layer)
            if child.kind == "d":
                stack.append((rel + "/", child))
    return out


def merged_usage(lowers: list[Path], rel: str) -> tuple[int, int]:
    """(bytes allocated, entries) of the directory ``rel`` and everything below it in the merged view, each
    entry counted in the layer that provides it: du of the merged tree, what a plain copy of it takes."""
    node = merged_tree(lowers)
    for name in Path(rel).parts:
        assert node.children is not None
        node = node.children[name]
    below = [lowers[layer] / rel / path for path, (_, _, layer) in flat_view(node).items()]
    return allocated([lowers[node.layer] / rel, *below])


def flatten(lowers: list[Path], dest: Path) -> int:
    """Build the merged tree at ``dest`` (same filesystem as the layers) from hard links; returns entries.

    Directories are made fresh with the providing layer's mode, owner and times; everything else is a
    hard link to the file in the layer that provides it, so nothing is copied. Only layerfs-over-1-layer
    reads it, and layerfs never writes a lower layer.
    """
    tree = merged_tree(lowers)
    count = 0
    dirs: list[tuple[Path, Path]] = [(lowers[tree.layer], dest)]
    dest.mkdir()
    stack = [(Path(), tree)]
    while stack:
        rel, node = stack.pop()
        for name, child in (node.children or {}).items():
            source = lowers[child.layer] / rel / name
            target = dest / rel / name
            count += 1
            if child.kind == "d":
                target.mkdir()
                dirs.append((source, target))
                stack.append((rel / name, child))
            else:
                os.link(source, target, follow_symlinks=False)
    for source, target in reversed(dirs):  # children first, so their creation does not bump parent mtimes
        st = os.stat(source, follow_symlinks=False)
        os.chown(target, st.st_uid, st.st_gid)
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return count


def scan_mount(root: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """relative path -> (kind, size) of everything visible under a mount point (sizes of files only)."""
    out: dict[str, tuple[str, int]] = {}
    base = os.fspath(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                kind = kind_of(st.st_mode)
                path = rel + e.name
                out[path] = (kind, st.st_size if kind == "f" else 0)
                if kind == "d":
                    stack.append(path + "/")
    return out


def compare_views(expected: dict[str, tuple[str, int, int]], seen: dict[str, tuple[str, int]]) -> dict:
    """How a mount's view differs from the merged view: counts and a few examples of each difference."""
    missing = sorted(p for p in expected if p not in seen)
    extra = sorted(p for p in seen if p not in expected)
    kind = sorted(p for p in seen if p in expected and seen[p][0] != expected[p][0])
    size = sorted(
        p for p in seen if p in expected and seen[p][0] == expected[p][0] == "f" and seen[p][1] != expected[p][1]
    )
    extra_kinds: dict[str, int] = {}
    for p in extra:
        extra_kinds[seen[p][0]] = extra_kinds.get(seen[p][0], 0) + 1
    return {
        "entries": len(seen),
        "expected": len(expected),
        "identical": not (missing or extra or kind or size),
        "missing": len(missing),
        "extra": len(extra),
        "extra_by_kind": extra_kinds,
        "kind_differs": len(kind),
        "size_differs": len(size),
        "examples": {"missing": missing[:5], "extra": extra[:5], "kind_differs": kind[:5], "size_differs": size[:5]},
    }
