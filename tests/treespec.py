"""Seeded random layered trees, and rendering them to disk in either whiteout form.

A ``TreeSpec`` is a stack of lower layers, each a mapping from a path (``a/b/c``, no leading slash) to a
node: regular file, directory (possibly opaque), symlink, hard link to another file of the same layer,
fifo, device, or whiteout. ``generate(seed)`` builds three layers the way image layers come about: the
bottom one is a fresh tree, each layer above changes files, adds entries, deletes names of the layers
below (whiteouts), turns some directories opaque, and replaces files by directories and back.

``render(layer, dest, form)`` writes one layer as a real directory:

- ``form="overlay"``: whiteouts are 0/0 character devices, opaque dirs carry ``trusted.overlay.opaque=y``
  (the only form kernel overlayfs reads, so the oracle always gets it);
- ``form="oci"``: whiteouts are empty ``.wh.NAME`` files, opaque dirs contain ``.wh..wh..opq``.

Every timestamp is fixed and far in the past (before ``RECENT``), so two renders are identical and a
later mtime means "changed while mounted". Absolute symlink targets and names are chosen so that even a
symlink followed by mistake on the host cannot reach anything real (``/d0/...`` does not exist there).
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FORMS = ("overlay", "oci")

# Every time the generators set lies before this instant; anything at or after it was set by "now".
RECENT_NS = 1_577_836_800 * 10**9  # 2020-01-01
_BASE_NS = 1_104_537_600 * 10**9  # 2005-01-01
_SPAN_NS = 10 * 365 * 86_400 * 10**9

OWNERS = ((0, 0), (0, 0), (1000, 1000), (1000, 100), (33, 33), (65534, 65534))
FILE_MODES = (0o644, 0o644, 0o600, 0o755, 0o755, 0o700, 0o444, 0o640, 0o4755, 0o2755, 0o6755, 0o1644)
DIR_MODES = (0o755, 0o755, 0o755, 0o700, 0o775, 0o2775, 0o1777, 0o555)


@dataclass(frozen=True)
class Meta:
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class File:
    data: bytes
    meta: Meta


@dataclass(frozen=True)
class Dir:
    meta: Meta
    opaque: bool = False


@dataclass(frozen=True)
class Symlink:
    target: str
    meta: Meta  # mode unused


@dataclass(frozen=True)
class HardLink:
    to: str  # path of a File in the same layer


@dataclass(frozen=True)
class Special:
    """A fifo (``kind == stat.S_IFIFO``) or a device node with ``rdev``."""

    kind: int
    rdev: int
    meta: Meta


@dataclass(frozen=True)
class Whiteout:
    pass


Node = File | Dir | Symlink | HardLink | Special | Whiteout
Layer = dict  # path -> Node, parents before children


@dataclass
class TreeSpec:
    seed: int
    layers: list[Layer] = field(default_factory=list)  # top first, like overlay's lowerdir

    def paths(self) -> set[str]:
        """Every path any layer mentions (visible or hidden): good names to try in operations."""
        return {p for layer in self.layers for p in layer}


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def ancestors(path: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _below(path: str, visible: dict) -> list[str]:
    prefix = path + "/"
    return [p for p in visible if p.startswith(prefix)]


def merge(layers_bottom_first: Iterable[Layer]) -> dict[str, Node]:
    """The merged view of ``layers_bottom_first`` by overlay's rules: path -> topmost node (hard links
    resolved to their file). The generator uses it to choose what to change; tests check it against a
    real kernel mount so it cannot silently drift."""
    visible: dict[str, Node] = {}
    for layer in layers_bottom_first:
        for path in sorted(layer, key=lambda p: p.count("/")):
            node = layer[path]
            if isinstance(node, HardLink):
                node = layer[node.to]
            old = visible.get(path)
            replaces_dir = not (isinstance(node, Dir) and not node.opaque and isinstance(old, Dir))
            if replaces_dir:
                for child in _below(path, visible):
                    del visible[child]
            if isinstance(node, Whiteout):
                visible.pop(path, None)
            else:
                visible[path] = node
    return visible


NAME_MAX = 255


def odd_name(rng: random.Random, name: str, longest: int = NAME_MAX) -> str:
    """``name``, now and then made awkward: spaces, non-ASCII, a leading dot, not UTF-8 at all (a
    surrogate-escaped byte, as os functions take it), or as long as ``longest`` bytes allow."""
    odd = rng.random()
    if odd < 0.04:
        return name + " with space"
    if odd < 0.07:
        return name + "-ünï"
    if odd < 0.09:
        return "." + name
    if odd < 0.11:
        return name + "-latin1-\udce9t\udce9"  # b"\xe9t\xe9": not UTF-8
    if odd < 0.13:
        return name + "-" + "L" * (longest - len(name) - 1)
    return name


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counter = 0

    # -- small random pieces ------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self.counter += 1
        return odd_name(self.rng, f"{prefix}{self.counter}", longest=NAME_MAX - len(".wh."))

    def time(self) -> int:
        return _BASE_NS + self.rng.randrange(_SPAN_NS)

    def xattrs(self) -> tuple[tuple[str, bytes], ...]:
        if self.rng.random() > 0.25:
            return ()
        names = self.rng.sample(["user.a", "user.comment", "user.mime_type", "user.big"], self.rng.randint(1, 2))
        return tuple(
            sorted((n, self.rng.randbytes(300 if n == "user.big" else self.rng.randint(0, 12))) for n in names)
        )

    def meta(self, modes: tuple[int, ...], xattrs: bool = True) -> Meta:
        uid, gid = self.rng.choice(OWNERS)
        return Meta(self.rng.choice(modes), uid, gid, self.time(), self.xattrs() if xattrs else ())

    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.12:
            size = 0
        elif r < 0.75:
            size = self.rng.randint(1, 4096)
        elif r < 0.95:
            size = self.rng.randint(4097, 64 * 1024)
        else:
            size = self.rng.randint(64 * 1024, 200 * 1024)
        if self.rng.random() < 0.5:
            return self.rng.randbytes(size)
        line = f"line of {self.counter}\n".encode()
        return (line * (size // len(line) + 1))[:size]

    def symlink_target(self, path: str, visible: dict) -> str:
        """Relative (staying inside the tree), absolute (meaningful only inside the tree), or dangling."""
        r = self.rng.random()
        depth = path.count("/")
        if r < 0.2:
            return "missing-" + str(self.counter)  # dangling
        if not visible:
            return "nowhere"
        other = self.rng.choice(sorted(visible))
        if r < 0.5:
            return "/" + other
        up = "../" * depth
        return up + other

    # -- layers ---------------------------------------------------------------------------------

    def ensure_parents(self, layer: Layer, path: str, visible: dict) -> bool:
        """Give ``layer`` the directories above ``path``, with the metadata the lower view has for them
        (as an image layer does). False when the layer has something else there already."""
        for anc in ancestors(path):
            node = layer.get(anc)
            if node is None:
                below = visible.get(anc)
                layer[anc] = Dir(below.meta) if isinstance(below, Dir) else Dir(self.meta(DIR_MODES))
            elif not isinstance(node, Dir):
                return False
        return True

    def new_entry(self, layer: Layer, path: str, visible: dict) -> None:
        r = self.rng.random()
        if r < 0.55:
            layer[path] = File(self.data(), self.meta(FILE_MODES))
        elif r < 0.72:
            layer[path] = Symlink(self.symlink_target(path, visible), self.meta(FILE_MODES, xattrs=False))
        elif r < 0.80:
            files = [p for p, n in layer.items() if isinstance(n, File)]
            if files:
                layer[path] = HardLink(self.rng.choice(files))
            else:
                layer[path] = File(self.data(), self.meta(FILE_MODES))
        elif r < 0.92:
            layer[path] = Special(stat.S_IFIFO, 0, self.meta((0o644, 0o600, 0o666), xattrs=False))
        else:
            # Device nodes are never opened by the tests; the block one names no real device.
            rdev = self.rng.choice((os.makedev(1, 3), os.makedev(1, 5), os.makedev(240, 77)))
            kind = stat.S_IFBLK if rdev == os.makedev(240, 77) else stat.S_IFCHR
            layer[path] = Special(kind, rdev, self.meta((0o666, 0o600, 0o660), xattrs=False))

    def fresh_tree(self, layer: Layer, root: str, visible: dict, entries: int, depth: int) -> None:
        """Fill ``layer`` below directory ``root`` ('' for the top) with about ``entries`` entries."""
        dirs = [root]
        for _ in range(entries):
            parent = self.rng.choice(dirs)
            path = f"{parent}/" if parent else ""
            if self.rng.random() < 0.2 and parent.count("/") < depth:
                path += self.name("d")
                layer[path] = Dir(self.meta(DIR_MODES))
                dirs.append(path)
            else:
                path += self.name("f")
                self.new_entry(layer, path, visible)

    def change_layer(self, visible: dict, seen: set[str]) -> Layer:
        """A layer over ``visible``: modifications, additions, deletions, opaque and type changes.
        ``seen`` holds every path of the layers below; hidden ones are sometimes brought back."""
        layer: Layer = {}
        paths = sorted(visible)
        rng = self.rng
        dirs = [p for p in paths if isinstance(visible[p], Dir)]
        hidden = sorted(p for p in seen - visible.keys() if isinstance(visible.get(parent_of(p)), Dir) or "/" not in p)

        def taken(path: str) -> bool:
            # Only one node per path per layer, and nothing below something this layer replaced.
            return path in layer or any(a in layer and not isinstance(layer[a], Dir) for a in ancestors(path))

        files = [p for p in paths if isinstance(visible[p], File)]
        others = [p for p in paths if not isinstance(visible[p], Dir)]
        for _ in range(len(paths) // 2 + 10):
            r = rng.random()
            # Each change picks a path of the kind it needs; paths this layer already decided are skipped.
            pool = files if r < 0.2 else paths if r < 0.4 else dirs if r < 0.58 else others if r < 0.66 else dirs
            path = rng.choice(pool) if pool else ""
            if (
                not path
                or taken(path)
                or any(isinstance(layer.get(a), Dir) and layer[a].opaque for a in ancestors(path))
            ):
                continue
            if r < 0.2:  # modified file
                if self.ensure_parents(layer, path, visible):
                    layer[path] = File(self.data(), self.meta(FILE_MODES))
            elif r < 0.4:  # deleted name, file or whole directory
                if not _below(path, layer) and self.ensure_parents(layer, path, visible):
                    layer[path] = Whiteout()
            elif r < 0.5:  # replaced directory: opaque, new content
                if not _below(path, layer) and self.ensure_parents(layer, path, visible):
                    layer[path] = Dir(self.meta(DIR_MODES), opaque=True)
                    self.fresh_tree(layer, path, visible, rng.randint(0, 6), path.count("/") + 2)
            elif r < 0.58:  # same directory, other metadata
                if self.ensure_parents(layer, path, visible):
                    layer[path] = Dir(self.meta(DIR_MODES))
            elif r < 0.66:  # a file becomes a directory
                if self.ensure_parents(layer, path, visible):
                    layer[path] = Dir(self.meta(DIR_MODES))
                    self.fresh_tree(layer, path, visible, rng.randint(0, 4), path.count("/") + 1)
            elif r < 0.70:  # a directory becomes a file
                if not _below(path, layer) and self.ensure_parents(layer, path, visible):
                    layer[path] = File(self.data(), self.meta(FILE_MODES))
            elif r < 0.78 and hidden:  # a name deleted below comes back
                back = rng.choice(hidden)
                if not taken(back) and not _below(back, layer) and self.ensure_parents(layer, back, visible):
                    if rng.random() < 0.3:
                        layer[back] = Dir(self.meta(DIR_MODES))
                    else:
                        self.new_entry(layer, back, visible)
            else:  # something new in an existing directory
                parent = rng.choice(dirs + [""])
                if taken(parent) and not isinstance(layer.get(parent), Dir):
                    continue
                new = (parent + "/" if parent else "") + self.name("n")
                if self.ensure_parents(layer, new, visible):
                    if rng.random() < 0.15:
                        layer[new] = Dir(self.meta(DIR_MODES))
                        self.fresh_tree(layer, new, visible, rng.randint(1, 5), new.count("/") + 2)
                    else:
                        self.new_entry(layer, new, visible)
        # A few whiteouts of names nothing below has: harmless, and must stay invisible.
        for _ in range(2):
            layer.setdefault(self.name("ghost"), Whiteout())
        # Hard links that point at a file this layer replaced are fine; ones whose file was whited out
        # cannot exist, so drop them.
        for p, n in list(layer.items()):
            if isinstance(n, HardLink) and not isinstance(layer.get(n.to), File):
                del layer[p]
        return _ordered(layer)


def _ordered(layer: Layer) -> Layer:
    return dict(sorted(layer.items(), key=lambda kv: (kv[0].count("/"), kv[0])))


def generate(seed: int, size: int = 180) -> TreeSpec:
    """Three lower layers, a few hundred entries in all, fully determined by ``seed``."""
    gen = _Generator(seed)
    bottom: Layer = {}
    gen.fresh_tree(bottom, "", bottom, size, depth=4)  # its symlinks point into itself
    layers = [_ordered(bottom)]
    for _ in range(2):
        seen = {p for layer in layers for p in layer}
        layers.append(gen.change_layer(merge(layers), seen))
    return TreeSpec(seed, list(reversed(layers)))


# -- rendering --------------------------------------------------------------------------------------


def _apply_meta(path: str, meta: Meta, *, symlink: bool = False) -> None:
    for name, value in meta.xattrs:
        os.setxattr(path, name, value, follow_symlinks=False)
    os.chown(path, meta.uid, meta.gid, follow_symlinks=False)
    if not symlink:
        os.chmod(path, meta.mode)  # after chown, which clears setuid/setgid
    os.utime(path, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=False)


def render(layer: Layer, dest: Path, form: str) -> None:
    """Write ``layer`` into the empty directory ``dest`` with whiteouts in ``form``."""
    assert form in FORMS, form
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[str, Dir]] = []
    links: list[tuple[str, HardLink]] = []
    for rel, node in layer.items():
        real = os.path.join(dest, rel)
        if isinstance(node, Dir):
            os.mkdir(real)
            if node.opaque:
                if form == "overlay":
                    os.setxattr(real, "trusted.overlay.opaque", b"y")
                else:
                    open(os.path.join(real, ".wh..wh..opq"), "wb").close()
            dirs.append((real, node))
        elif isinstance(node, File):
            with open(real, "wb") as f:
                f.write(node.data)
            _apply_meta(real, node.meta)
        elif isinstance(node, Symlink):
            os.symlink(node.target, real)
            _apply_meta(real, node.meta, symlink=True)
        elif isinstance(node, Special):
            os.mknod(real, node.kind | 0o600, node.rdev)
            _apply_meta(real, node.meta)
        elif isinstance(node, HardLink):
            links.append((real, node))
        elif isinstance(node, Whiteout):
            if form == "overlay":
                os.mknod(real, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                head, name = os.path.split(real)
                open(os.path.join(head, ".wh." + name), "wb").close()
    for real, node in links:
        os.link(os.path.join(dest, node.to), real)
    # Directory times last, deepest first: adding children changed them.
    for real, node in reversed(dirs):
        _apply_meta(real, node.meta)
    os.utime(dest, ns=(_BASE_NS, _BASE_NS))


def render_all(spec: TreeSpec, base: Path, form: str) -> list[Path]:
    """Render every layer of ``spec`` under ``base`` (``base/l0`` on top); returns the lowerdir list."""
    out = []
    for i, layer in enumerate(spec.layers):
        d = Path(base) / f"l{i}"
        render(layer, d, form)
        out.append(d)
    return out


def describe(spec: TreeSpec) -> str:
    """One line for logs: how big the generated stack is."""
    counts = [len(layer) for layer in spec.layers]
    whiteouts = sum(isinstance(n, Whiteout) for layer in spec.layers for n in layer.values())
    opaque = sum(isinstance(n, Dir) and n.opaque for layer in spec.layers for n in layer.values())
    return f"seed {spec.seed}: layers (top first) {counts} entries, {whiteouts} whiteouts, {opaque} opaque dirs"
