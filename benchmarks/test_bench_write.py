"""Writing workloads: copy-up of a 100 MiB lower file, small-file create/delete, a 256 MiB sequential
write in 1 MiB writes and a 100 MiB one in 4 KiB writes, untar, a metadata mix, a build-like mix, a podman
build. Each runs on kernel overlayfs (the baseline) and layerfs over the same three layers."""

from __future__ import annotations

import pytest

from benchmarks.conftest import IMPLS

WRITE_WORKLOADS = [
    "copyup",
    "create-delete",
    "seqwrite",
    "smallwrite",
    "untar",
    "meta-mix",
    "build-mix",
    "podman-build",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", WRITE_WORKLOADS)
def test_write(measure, workload: str, impl: str) -> None:
    assert measure(workload, impl) > 0
