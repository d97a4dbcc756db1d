"""Reading workloads: stat and read the whole tree, big-file sequential and random reads, opening and
closing, a container start. Each runs on kernel overlayfs (the baseline) and layerfs over the same three
layers."""

from __future__ import annotations

import pytest

from benchmarks.conftest import IMPLS

READ_WORKLOADS = [
    "stat-cold",
    "stat-warm",
    "read-cold",
    "read-warm",
    "seqread-cold",
    "seqread-warm",
    "randread",
    "open-close",
    "start",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload", READ_WORKLOADS)
def test_read(measure, workload: str, impl: str) -> None:
    assert measure(workload, impl) > 0
