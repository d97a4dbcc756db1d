"""How long an image takes to travel to and from a registry: ``layerfs pull`` against ``skopeo copy`` to an
OCI layout followed by ``layerfs import``, and against ``podman pull``; ``layerfs push`` against ``skopeo
copy`` (from an OCI layout) and ``podman push``. All against docker-registry on a loopback port, in the same
run, interleaved, ``--reps`` times; medians (and min..max) printed as a table.

The image: four layers (a busybox root filesystem and 3 layers of generated files: random data, which does
not compress, and text, which does), about 100 MiB of gzip blobs, built once into the cache. Every pull
goes into an empty store (or layout, or Podman storage); every push goes to a registry started empty for
that pass (so nothing is mounted from another repository, and no blob is there already); registries
start and stores are emptied untimed.

    .venv/bin/python -m benchmarks.registrybench [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layerfs.oci.layout import write_image

from .podman import BUSYBOX
from .util import log, remove_mounted_tree, run

_CACHE = Path("/var/cache/layerfs-bench/registry")
_LAYERFS = [sys.executable, "-m", "layerfs"]
_TAG = "1"


def _image() -> Path:
    """The OCI layout of the benchmark's image (tag ``1``), built once."""
    layout = _CACHE / "oci"
    if layout.is_dir():
        return layout
    build = Path(tempfile.mkdtemp(prefix="registrybench-"))
    try:
        dirs = []
        for number in range(4):
            layer = build / f"layer{number}"
            if number == 0:
                (layer / "bin").mkdir(parents=True)
                shutil.copy2(BUSYBOX, layer / "bin/busybox")
                os.symlink("busybox", layer / "bin/sh")
            for n in range(200):
                path = layer / f"data{number}/d{n % 6}/f{n}"
                path.parent.mkdir(parents=True, exist_ok=True)
                size = (n % 7 + 1) * 64 << 10
                path.write_bytes(
                    os.urandom(size) if n % 2 else (f"line {n} of layer {number}\n" * size)[:size].encode()
                )
            dirs.append(str(layer))
        tmp = _CACHE.with_name("registry-building")
        shutil.rmtree(tmp, ignore_errors=True)
        write_image(str(tmp / "oci"), _TAG, dirs, {"architecture": "amd64", "os": "linux", "config": {}})
        tmp.rename(_CACHE)
    finally:
        shutil.rmtree(build)
    return layout


@contextmanager
def _registry(base: Path) -> Iterator[str]:
    """docker-registry on a free loopback port, storing under ``base``; its host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
    base.mkdir(parents=True)
    (base / "config.yml").write_text(
        f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: "
        f"{{rootdirectory: {base}/storage}}}}\nhttp: {{addr: '{host}'}}\n"
    )
    server = subprocess.Popen(
        ["docker-registry", "serve", str(base / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(host.split(":"), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield host
    finally:
        server.terminate()
        server.wait()


def _podman_env(base: Path) -> dict[str, str]:
    """Podman with a storage of its own under ``base`` (kernel overlayfs), as tests/test_podman.py runs it: the
    environment that says so (the other commands ignore it)."""
    for d in ("graph", "run", "tmp"):
        (base / d).mkdir(parents=True)
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\nrunroot = "{base}/run"\n'
    )
    (base / "containers.conf").write_text(
        f'[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\ntmp_dir = "{base}/tmp"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "CONTAINERS_CONF": str(base / "containers.conf"),
    }


def _timed(env: dict[str, str], *commands: list[str]) -> float:
    """Seconds ``commands`` take, one after the other, after a sync."""
    subprocess.run(["sync"], check=True)
    started = time.monotonic()
    for command in commands:
        run(command, env=env, timeout=600)
    return time.monotonic() - started


def _repetition(here: Path, ref: str) -> dict[str, float]:
    """One pass of every pull and push, in ``here`` (removed after)."""
    env = _podman_env(here / "podman")
    store, oci, imported = str(here / "store"), f"oci:{here / 'oci'}:{_TAG}", str(here / "imported")
    took = {
        "pull: layerfs pull": _timed(env, _LAYERFS + ["pull", "--root", store, "--tls-verify=false", ref]),
        "pull: skopeo copy + layerfs import": _timed(
            env,
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", oci],
            _LAYERFS + ["import", "--root", imported, oci, "bench"],
        ),
        "pull: podman pull": _timed(env, ["podman", "pull", "--tls-verify=false", ref]),
    }
    pushes = {
        "push: layerfs push": lambda to: _LAYERFS + ["push", "--root", store, "--tls-verify=false", ref, to],
        "push: skopeo copy": lambda to: ["skopeo", "copy", "--dest-tls-verify=false", oci, f"docker://{to}"],
        "push: podman push": lambda to: ["podman", "push", "--tls-verify=false", ref, f"docker://{to}"],
    }
    for number, (name, command) in enumerate(pushes.items()):
        with _registry(here / f"target{number}") as target:
            took[name] = _timed(env, command(f"{target}/pushed/image:{_TAG}"))
    try:
        run(["podman", "system", "reset", "--force"], env=env)
    finally:
        remove_mounted_tree(here)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    layout = _image()
    blobs = sum(f.stat().st_size for f in (layout / "blobs/sha256").iterdir())
    log(f"image: 4 layers, {blobs / (1 << 20):.0f} MiB of blobs; load: {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="registrybench-", dir="/var/tmp"))
    times: dict[str, list[float]] = {}
    try:
        with _registry(work / "source") as source:
            ref = f"{source}/bench/image:{_TAG}"
            run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{_TAG}", f"docker://{ref}"])
            for rep in range(args.reps):
                log(f"repetition {rep + 1}/{args.reps}")
                for name, seconds in _repetition(work / f"rep{rep}", ref).items():
                    times.setdefault(name, []).append(seconds)
    finally:
        remove_mounted_tree(work)
    _table(times)
    log(f"load at the end: {os.getloadavg()[0]:.2f}")
    return 0


def _table(times: dict[str, list[float]]) -> None:
    width = max(map(len, times))
    print(f"{'':{width}}  {'median s':>9}  {'min..max s':>13}  {'/ fastest':>9}")
    for kind in ("pull", "push"):
        rows = {name: samples for name, samples in times.items() if name.startswith(kind)}
        fastest = min(statistics.median(s) for s in rows.values())
        for name, samples in rows.items():
            median = statistics.median(samples)
            print(f"{name:{width}}  {median:9.2f}  {min(samples):6.2f}..{max(samples):<6.2f}  {median / fastest:8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
