"""The benchmark layers, built once per machine and cached outside the repository.

Three lower layers, top first, all in overlay's on-disk form (0/0 whiteouts, trusted.overlay.opaque):

- ``base``: a Debian bookworm rootfs from ``debootstrap --variant=minbase`` with python3, perl, pip and
  git added (about 14,000 entries, 300+ MB; the interpreters make the container-start workload real),
  its downloaded .debs removed as image builds do; or, when debootstrap cannot run, a generated tree of
  the same size and mix (benchmarks/generated.py). Plus ``bench/big-512M`` and ``bench/big-100M``.
- ``mod``: modifies about 300 files, deletes about 200 files and 6 directories (whiteouts), replaces 2
  directories (opaque), adds about 1,300 files.
- ``app``: a small top layer: adds 300 files, modifies 30, deletes 50 (some of them mod's), replaces one
  of mod's directories (opaque).

Also ``untar.tar`` (the Python library directories, a few thousand files) and ``manifest.json``: counts,
sizes and the paths workloads use (files and directories that meta-mix may delete, one slice per
repetition; build-mix's sources; the container-start commands).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import generated, layers
from .util import log, remove_tree, run

VERSION = 1  # bump when the recipe changes: a new cache directory is built
DEFAULT_CACHE = Path(os.environ.get("LAYERFS_BENCH_CACHE", "/var/cache/layerfs-bench"))
LAYER_NAMES = ["app", "mod", "base"]  # top first, as lowerdir= lists them
BIG_FILES = {"big-512M": 512 << 20, "big-100M": 100 << 20}
DEBOOTSTRAP_INCLUDE = ["python3", "perl", "python3-pip", "git"]
MIRROR = "http://deb.debian.org/debian"
MAX_REPS = 8  # meta-mix consumes a fresh slice of lower files per pass (the last for the untimed one)
# Where deletions and modifications may land: nothing any workload's programs need.
_SAFE = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/zoneinfo/",
    "usr/share/locale/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/common-licenses/",
    "usr/share/bash-completion/",
)
START_COMMANDS = [
    ["/usr/bin/ls", "-l", "/usr/bin"],
    ["/usr/bin/python3", "-c", "import json, email.parser, http.client, asyncio, decimal, argparse, logging"],
    ["/usr/bin/perl", "-MPOSIX", "-MFile::Temp", "-MJSON::PP", "-MData::Dumper", "-e", "1"],
    ["/usr/bin/git", "--version"],
]


@dataclass
class Data:
    """A built data set: its directory and manifest."""

    root: Path
    manifest: dict

    @property
    def layer_dirs(self) -> list[Path]:
        return [self.root / name for name in LAYER_NAMES]

    @property
    def untar(self) -> Path:
        return self.root / "untar.tar"


def ensure(cache: Path = DEFAULT_CACHE, source: str = "auto") -> Data:
    """The cached data set, built first if missing. ``source``: auto, debootstrap or generated."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {"auto": None, "debootstrap": "debootstrap", "generated": "generated"}[source]
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits and reuses
        for kind in [wanted] if wanted else ["debootstrap", "generated"]:
            done = cache / f"data-v{VERSION}-{kind}"
            if (done / "manifest.json").exists():
                return Data(done, json.loads((done / "manifest.json").read_text()))
        kind = "generated"
        if wanted in (None, "debootstrap"):
            try:
                _debootstrap(cache)
                kind = "debootstrap"
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                if wanted:
                    raise
                log(f"debootstrap failed ({e}); generating a rootfs instead")
        return _build(cache, kind)


def _debootstrap(cache: Path) -> Path:
    """The plain debootstrap tree, kept apart so that rebuilding the layers does not download again."""
    done = cache / "debootstrap-bookworm"
    if done.is_dir():
        return done
    tmp = cache / "debootstrap-bookworm.tmp"
    remove_tree(tmp)
    log("building the base layer with debootstrap (once; about a minute)")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(DEBOOTSTRAP_INCLUDE),
            "bookworm",
            str(tmp),
            MIRROR,
        ],
        timeout=1800,
    )
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()  # as image builds do (apt-get clean)
    os.rename(tmp, done)
    return done


def _build(cache: Path, kind: str) -> Data:
    done = cache / f"data-v{VERSION}-{kind}"
    tmp = cache / f"data-v{VERSION}-{kind}.tmp"
    remove_tree(tmp)
    tmp.mkdir()
    base, mod, app = tmp / "base", tmp / "mod", tmp / "app"
    if kind == "debootstrap":
        run(["cp", "-a", str(cache / "debootstrap-bookworm"), str(base)])
        start: dict = {"kind": "chroot", "commands": START_COMMANDS}
    else:
        log("generating the base layer (once)")
        generated.generate_rootfs(base)
        start = generated.start_lookups(base)
    log("writing the big files")
    _big_files(base / "bench")
    log("making the mod and app layers")
    rng = random.Random(7)
    _make_mod(base, mod, rng)
    _make_app(base, mod, app, rng)
    lowers = [app, mod, base]
    view = layers.flat_view(layers.merged_tree(lowers))
    untar_dirs = [d for d in ("usr/lib/python3.11", "usr/lib/python3") if (base / d).is_dir()]
    run(["tar", "-cf", str(tmp / "untar.tar"), "-C", str(base)] + untar_dirs)
    untar_files = int(run(["sh", "-c", f"tar -tf {tmp / 'untar.tar'} | wc -l"]).stdout)
    manifest = {
        "version": VERSION,
        "source": kind,
        "debootstrap": {"variant": "minbase", "suite": "bookworm", "include": DEBOOTSTRAP_INCLUDE, "mirror": MIRROR}
        if kind == "debootstrap"
        else None,
        "layers": LAYER_NAMES,
        "big": {name: f"bench/{name}" for name in BIG_FILES},
        "stats": _stats(lowers, view),
        "untar_entries": untar_files,
        "start": start,
        **_picks(view, rng),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    os.rename(tmp, done)
    log(f"data ready in {done}: {manifest['stats']['merged']}")
    return Data(done, manifest)


def _big_files(directory: Path) -> None:
    directory.mkdir()
    rng = random.Random(3)
    block = rng.randbytes(1 << 20)
    for name, size in BIG_FILES.items():
        with open(directory / name, "wb") as f:
            for i in range(size >> 20):
                f.write(block[i % 251 :] + block[: i % 251])  # every MiB differs: nothing dedups or compresses


def _regular_files(root: Path, prefixes: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            path = f"{rel}/{name}" if rel != "." else name
            if path.startswith(prefixes) and stat.S_ISREG(os.lstat(root / path).st_mode):
                out.append(path)
    return out


def _leaf_dirs(root: Path, prefixes: tuple[str, ...], most: int) -> list[str]:
    """Directories with 1..most entries, all regular files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if not dirnames and 0 < len(filenames) <= most and (rel + "/").startswith(prefixes):
            if all(stat.S_ISREG(os.lstat(os.path.join(dirpath, f)).st_mode) for f in filenames):
                out.append(rel)
    return sorted(out)


def _parents(base: Path, layer: Path, rel: str) -> None:
    """Create rel's parent directories in ``layer`` with the base layer's metadata, as a layer tar has."""
    parts = Path(rel).parts[:-1]
    for i in range(1, len(parts) + 1):
        sub = Path(*parts[:i])
        target = layer / sub
        if target.is_dir():
            continue
        target.mkdir()
        source = base / sub
        if source.is_dir():
            st = source.stat()
            os.chown(target, st.st_uid, st.st_gid)
            os.chmod(target, stat.S_IMODE(st.st_mode))


def _write(base: Path, layer: Path, rel: str, data: bytes) -> None:
    _parents(base, layer, rel)
    (layer / rel).write_bytes(data)


def _payload(rng: random.Random) -> bytes:
    size = int(min(2_000_000, rng.lognormvariate(8.5, 1.3)))  # median ~5 KB
    return rng.randbytes(size)


def _make_mod(base: Path, mod: Path, rng: random.Random) -> None:
    mod.mkdir()
    files = _regular_files(base, _SAFE)
    rng.shuffle(files)
    dirs = _leaf_dirs(base, _SAFE, 30)
    rng.shuffle(dirs)
    gone_dirs, opaque_dirs = dirs[:6], dirs[6:8]
    taken = tuple(d + "/" for d in gone_dirs + opaque_dirs)
    files = [f for f in files if not f.startswith(taken)]
    for rel in files[:300]:  # modified: the same file with a line added
        _write(base, mod, rel, (base / rel).read_bytes() + b"\n# changed in layer mod\n")
    for rel in files[300:500]:
        _parents(base, mod, rel)
        layers.make_whiteout(mod / rel)
    for rel in gone_dirs:
        _parents(base, mod, rel)
        layers.make_whiteout(mod / rel)
    for rel in opaque_dirs:
        _parents(base, mod, rel)
        (mod / rel).mkdir()
        os.setxattr(mod / rel, layers.OPAQUE_XATTR, b"y")
        for i in range(3):
            (mod / rel / f"replaced-{i}").write_bytes(_payload(rng))
    for i in range(1200):  # a vendored tree
        _write(base, mod, f"opt/vendor/pkg{i % 40}/lib/file{i}.dat", _payload(rng))
    for i in range(100):
        _write(base, mod, f"usr/local/bin/tool{i}", _payload(rng))
        os.chmod(mod / f"usr/local/bin/tool{i}", 0o755)


def _make_app(base: Path, mod: Path, app: Path, rng: random.Random) -> None:
    app.mkdir()
    for i in range(300):
        _write(base, app, f"opt/app/module{i % 20}/part{i}.py", _payload(rng))
    etc = [f for f in _regular_files(base, ("etc/",)) if os.path.getsize(base / f) < 100_000]
    rng.shuffle(etc)
    for rel in etc[:30]:
        _write(base, app, rel, (base / rel).read_bytes() + b"\n# changed in layer app\n")
    _parents(mod, app, "opt/vendor/pkg7")
    (app / "opt/vendor/pkg7").mkdir()  # replaces mod's directory
    os.setxattr(app / "opt/vendor/pkg7", layers.OPAQUE_XATTR, b"y")
    (app / "opt/vendor/pkg7/only-this").write_bytes(_payload(rng))
    vendor = sorted(
        str(p.relative_to(mod))
        for p in (mod / "opt/vendor").rglob("*.dat")
        if not str(p).startswith(str(mod / "opt/vendor/pkg7/"))
    )
    for rel in vendor[:50:2]:  # delete some of mod's files
        _parents(mod, app, rel)
        layers.make_whiteout(app / rel)
    docs = [f for f in _regular_files(base, ("usr/share/man/",))]
    rng.shuffle(docs)
    for rel in docs[:25]:
        _parents(base, app, rel)
        layers.make_whiteout(app / rel)


def _picks(view: dict[str, tuple[str, int, int]], rng: random.Random) -> dict:
    """Workload targets taken from the merged view: entries the base layer alone provides."""
    base_index = len(LAYER_NAMES) - 1
    from_base = {p for p, (_, _, layer) in view.items() if layer == base_index}
    children: dict[str, list[str]] = {}
    for p in view:
        children.setdefault(os.path.dirname(p), []).append(p)
    meta_dirs = [
        d
        for d in sorted(from_base)
        if view[d][0] == "d"
        and d.startswith(_SAFE)
        and 0 < len(children.get(d, [])) <= 6
        and all(view[c][0] == "f" and c in from_base for c in children[d])
    ]
    rng.shuffle(meta_dirs)
    per_rep_dirs = 8
    meta_dirs = meta_dirs[: per_rep_dirs * MAX_REPS]
    in_meta_dirs = tuple(d + "/" for d in meta_dirs)
    meta_files = [
        p for p in sorted(from_base) if view[p][0] == "f" and p.startswith(_SAFE) and not p.startswith(in_meta_dirs)
    ]
    rng.shuffle(meta_files)
    per_rep_files = 150
    sources = sorted(
        p
        for p in from_base
        if view[p][0] == "f"
        and p.endswith(".py")
        and p.startswith(("usr/lib/python3", "usr/share/perl", "usr/include"))
    )
    if len(sources) < 600:
        sources = sorted(
            p for p in from_base if view[p][0] == "f" and 0 < view[p][1] < 200_000 and p.startswith("usr/")
        )
    rng.shuffle(sources)
    if len(meta_dirs) < per_rep_dirs * MAX_REPS or len(meta_files) < per_rep_files * MAX_REPS:
        raise RuntimeError("the rootfs is too small for meta-mix's targets")
    return {
        "meta_files": [meta_files[i * per_rep_files : (i + 1) * per_rep_files] for i in range(MAX_REPS)],
        "meta_dirs": [meta_dirs[i * per_rep_dirs : (i + 1) * per_rep_dirs] for i in range(MAX_REPS)],
        "build_sources": sorted(sources[:1000]),
    }


def _stats(lowers: list[Path], view: dict[str, tuple[str, int, int]]) -> dict:
    out = {}
    for path in lowers:
        n = size = wh = 0
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                n += 1
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0
                wh += layers.is_whiteout(st)
        out[path.name] = {"entries": n, "bytes": size, "whiteouts": wh}
    kinds: dict[str, int] = {}
    for kind, _, _ in view.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    out["merged"] = {"entries": len(view), "bytes": sum(s for _, s, _ in view.values()), "by_kind": kinds}
    return out


def describe(data: Data) -> str:
    s = data.manifest["stats"]
    mb = s["merged"]["bytes"] / 1e6
    return (
        f"{data.manifest['source']} rootfs, merged {s['merged']['entries']} entries / {mb:.0f} MB "
        f"(base {s['base']['entries']}, mod {s['mod']['entries']} with {s['mod']['whiteouts']} whiteouts, "
        f"app {s['app']['entries']} with {s['app']['whiteouts']})"
    )


def clear(cache: Path = DEFAULT_CACHE) -> None:
    """Remove every cached data set (tools/bench --rebuild)."""
    for p in cache.glob("data-v*"):
        remove_tree(p)
