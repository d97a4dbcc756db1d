"""Running workloads on mounts: one timed pass (``Trial``) and the interleaved comparison (``Runner``).

For each workload, every implementation runs in turn, then again, ``reps`` times (A B C A B C ...), so
that the machine's slow moments (it is shared) spread over all of them; the report quotes medians.
A pass that fails or exceeds the scale's timeout is recorded as an error for that implementation and
workload only; a FUSE daemon that hangs is killed, and its long-lived mount replaced.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import asdict, dataclass, field

from . import layers
from .impls import Impl
from .util import allocated, below, drop_caches, log
from .workloads import Ctx, Scale, Workload
from .workspace import Mount, Workspace, rss_kib, stop_daemon


@dataclass
class Sample:
    workload: str
    impl: str
    rep: int
    seconds: float | None = None
    count: int | None = None
    error: str | None = None
    upper_bytes: int | None = None  # allocated in the upper layer after the pass (Workload.measure_upper)
    upper_entries: int | None = None


@dataclass
class RssSample:
    at: float  # seconds since the run started
    workload: str
    rep: int
    impl: str
    mount: str  # "main" (lives the whole run) or "fresh"
    rss_kib: int
    hwm_kib: int


class Trial:
    """One pass of a workload on one implementation: ``begin`` (untimed), ``run`` (timed), ``finish``."""

    def __init__(self, ws: Workspace, main: Mount, workload: Workload, scale: Scale, rep: int) -> None:
        self.ws, self.main, self.workload, self.scale, self.rep = ws, main, workload, scale, rep
        self.mount = main
        self.temp: Mount | None = None
        self.ctx: Ctx | None = None

    def begin(self) -> Trial:
        w, impl = self.workload, self.main.impl
        if w.mode in ("cold", "fresh") and impl.kind != "native":
            self.temp = self.mount = self.ws.mount(impl, "fresh")
        if w.mode == "cold":
            drop_caches()
        else:
            os.sync()  # no pass pays for an earlier one's writeback
        tag = f"{w.name}-{impl.name}-{self.rep if self.rep >= 0 else 'w'}-{time.monotonic_ns() % 10**9}"
        self.ctx = Ctx(str(self.mount.root), self.ws.data, self.scale, self.rep, tag, impl.name)
        if w.prepare:
            w.prepare(self.ctx)
        return self

    def run(self) -> int:
        """The timed part. A watchdog kills a FUSE daemon that makes it overrun the timeout."""
        assert self.ctx is not None
        watchdog = threading.Timer(self.scale.timeout, stop_daemon, (self.mount,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return self.workload.body(self.ctx)
        finally:
            watchdog.cancel()

    def upper_usage(self) -> tuple[int | None, int | None]:
        """(bytes allocated, entries) in the upper layer, a fresh mount's: what this pass left there."""
        upper = self.mount.upper
        return (None, None) if upper is None else allocated(below(upper))

    def finish(self) -> None:
        try:
            if self.workload.cleanup and self.ctx is not None and os.path.isdir(self.ctx.root):
                self.workload.cleanup(self.ctx)
        finally:
            if self.temp is not None:
                self.ws.unmount(self.temp)
                self.temp = None


@dataclass
class Results:
    scale: str
    impls: list[str]
    workloads: list[str]
    samples: list[Sample] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    views: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # impl -> why
    inapplicable: dict[str, list[str]] = field(default_factory=dict)  # workload -> impls it cannot run on
    wall: dict[str, float] = field(default_factory=dict)  # workload -> seconds spent on it, setup included
    # workload -> its measure_upper directory in the merged view: {"path", "bytes", "entries"}
    upper_reference: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        return out


class Runner:
    def __init__(
        self,
        ws: Workspace,
        impls: list[Impl],
        workloads: list[Workload],
        scale: Scale,
        reps: int | None = None,
        views: bool = True,
    ) -> None:
        self.ws, self.impls, self.workloads, self.scale = ws, impls, workloads, scale
        self.reps = reps or scale.reps
        self.check_views = views
        self.main: dict[str, Mount] = {}
        self.t0 = time.monotonic()
        self.results = Results(scale.name, [i.name for i in impls], [w.name for w in workloads])

    def run(self) -> Results:
        for impl in self.impls:
            try:
                self.main[impl.name] = self.ws.mount(impl, "main")
            except Exception as e:  # (one implementation failing to mount skips it)
                self.results.skipped[impl.name] = f"mount failed: {e}"
                log(f"{impl.name}: {self.results.skipped[impl.name]}")
        if self.check_views:
            self._views()
        for w in self.workloads:
            started = time.monotonic()
            self._workload(w)
            self.results.wall[w.name] = round(time.monotonic() - started, 2)
        return self.results

    def _views(self) -> None:
        """What each implementation shows of the layers, against overlayfs's rules (untimed)."""
        log("comparing what each implementation sees with the merged view")
        expected = {False: layers.flat_view(layers.merged_tree(self.ws.lowers))}
        for impl in self.impls:
            m = self.main.get(impl.name)
            if m is None:
                continue
            try:
                seen = layers.scan_mount(m.root)
            except OSError as e:
                self.results.views[impl.name] = {"error": str(e)}
                continue
            self.results.views[impl.name] = layers.compare_views(expected[False], seen)

    @staticmethod
    def _eligible(w: Workload, i: Impl) -> bool:
        """Whether ``i`` takes part in ``w`` as far as its kind goes (w.impls may narrow it further)."""
        return (w.layered or not i.flat) and (not i.variant or i.name in (w.impls or ()))

    def _participants(self, w: Workload) -> list[Impl]:
        return [
            i
            for i in self.impls
            if i.name in self.main and self._eligible(w, i) and (w.impls is None or i.name in w.impls)
        ]

    def _workload(self, w: Workload) -> None:
        impls = self._participants(w)
        if w.impls is not None:
            self.results.inapplicable[w.name] = [
                i.name for i in self.impls if i.name not in w.impls and self._eligible(w, i)
            ]
        if w.measure_upper is not None:
            size, entries = layers.merged_usage(self.ws.lowers, w.measure_upper)
            self.results.upper_reference[w.name] = {"path": w.measure_upper, "bytes": size, "entries": entries}
        failed: set[str] = set()
        if w.mode == "warm":
            for impl in impls:
                self._pass(w, impl, -1, failed)
        elif impls:
            # One untimed pass first, so that no timed pass is the run's first of its kind: a cold pass
            # would read the disk where the others read the host's cache, and on this VM the first pass
            # to fill a few hundred MiB of page cache pays for the host faulting that memory in.
            self._pass(w, impls[0], -1, failed)
        for rep in range(self.reps):
            for impl in impls:
                if impl.name not in failed:
                    self._pass(w, impl, rep, failed)
        done = [s for s in self.results.samples if s.workload == w.name and s.seconds is not None]
        summary = ", ".join(
            f"{i.name} {min((s.seconds for s in done if s.impl == i.name), default=float('nan')):.3f}"
            for i in impls
            if i.name not in failed
        )
        log(f"{w.name}: {summary}" + (f"; failed: {', '.join(sorted(failed))}" if failed else ""))

    def _pass(self, w: Workload, impl: Impl, rep: int, failed: set[str]) -> None:
        trial = Trial(self.ws, self.main[impl.name], w, self.scale, rep)
        sample = Sample(w.name, impl.name, rep)
        try:
            trial.begin()
            gc.collect()
            gc.disable()
            try:
                t = time.perf_counter()
                sample.count = trial.run()
                sample.seconds = time.perf_counter() - t
            finally:
                gc.enable()
            if w.measure_upper is not None:
                sample.upper_bytes, sample.upper_entries = trial.upper_usage()
            self._rss(w, rep, impl, trial.mount)
        except Exception as e:  # (recorded; the other implementations go on)
            sample.error = f"{type(e).__name__}: {e}"[:500]
            failed.add(impl.name)
            log(f"{w.name} on {impl.name} (pass {rep}): {sample.error}")
        finally:
            try:
                trial.finish()
            except Exception as e:
                log(f"{w.name} on {impl.name}: cleanup failed: {e}")
        if rep >= 0:
            self.results.samples.append(sample)
        if sample.error:
            self._repair(impl)

    def _rss(self, w: Workload, rep: int, impl: Impl, mount: Mount) -> None:
        """The memory of the daemon that served the pass (before a fresh one is unmounted)."""
        if impl.kind != "fuse":
            return
        r = rss_kib(mount.pid)
        if r:
            kind = "main" if mount is self.main[impl.name] else "fresh"
            self.results.rss.append(RssSample(round(time.monotonic() - self.t0, 2), w.name, rep, impl.name, kind, *r))

    def _repair(self, impl: Impl) -> None:
        """After a failure, make sure the long-lived mount still answers; if not, replace it."""
        m = self.main[impl.name]
        if m.base is None:
            return
        try:
            os.stat(m.root)
            os.listdir(m.root)
            return
        except OSError:
            pass
        log(f"{impl.name}: its long-lived mount is broken; mounting it again")
        try:
            self.main[impl.name] = self.ws.replace(m)
        except Exception as e:
            self.results.skipped[impl.name] = f"remount failed: {e}"
            del self.main[impl.name]
