"""Writing workloads: copy-up of a 100 MiB lower file, small-file create/delete, a 256 MiB sequential
write, untar, a metadata mix and a build-like mix. Each runs on kernel overlayfs (the baseline) and
layerfs over the same three layers."""

from __future__ import annotations

import pytest

from benchmarks.conftest import IMPLS

WRITE_WORKLOADS = ["copyup", "create-delete", "seqwrite", "untar", "meta-mix", "build-mix"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", WRITE_WORKLOADS)
def test_write(measure, workload: str, impl: str) -> None:
    assert measure(workload, impl) > 0
