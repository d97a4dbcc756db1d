"""pytest-benchmark suites for layerfs, with kernel overlayfs measured in the same session as the baseline.

    .venv/bin/python -m pytest benchmarks/                       (as root; a few minutes)
    .venv/bin/python -m pytest benchmarks/ -k "stat or read"     a subset
    LAYERFS_BENCH_ROUNDS=5 .venv/bin/python -m pytest benchmarks/

The workloads, layers and mounting are the comparison runner's (benchmarks/compare.py); pytest-benchmark
groups results by workload so each group's table shows overlay against layerfs. Not part of tests/: the
test suite (and CI) never runs these.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from benchmarks import data, workloads
from benchmarks.impls import BY_NAME
from benchmarks.runner import Trial
from benchmarks.workspace import Mount, Workspace

IMPLS = ["overlay", "layerfs"]
ROUNDS = int(os.environ.get("LAYERFS_BENCH_ROUNDS", "3"))


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the benchmarks mount filesystems and drop caches: run them as root")


@pytest.fixture(scope="session")
def bench_space():
    """The cached layers copied into a fresh journaled ext4 image, removed at the end of the session."""
    with Workspace(data.ensure(), native=False, flat=False) as ws:
        yield ws


@pytest.fixture(scope="session")
def main_mounts(bench_space: Workspace) -> dict[str, Mount]:
    """One long-lived mount per implementation (cold and fresh passes make their own)."""
    mounts = {}
    for name in IMPLS:
        impl = BY_NAME[name]
        if impl.problem() is None:
            mounts[name] = bench_space.mount(impl, "main")
    return mounts


@pytest.fixture
def measure(benchmark, bench_space: Workspace, main_mounts: dict[str, Mount]) -> Callable[[str, str], int]:
    """measure(workload, impl): time ROUNDS passes of the workload as the runner does; returns the count."""

    def go(workload: str, impl: str) -> int:
        if impl not in main_mounts:
            pytest.skip(f"{impl}: {BY_NAME[impl].problem()}")
        w = workloads.BY_NAME[workload]
        benchmark.group = workload
        benchmark.extra_info.update(impl=impl, mode=w.mode, unit=w.unit)
        warm = 1  # an untimed first pass: a warm-up, or for the others no timed pass is the first of its kind
        reps = iter(range(-warm, ROUNDS))

        def setup():
            trial = Trial(bench_space, main_mounts[impl], w, workloads.FULL, next(reps))
            return (trial.begin(),), {}

        def teardown(trial: Trial) -> None:
            trial.finish()

        count = benchmark.pedantic(Trial.run, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=warm)
        benchmark.extra_info["count"] = count
        return count

    return go
