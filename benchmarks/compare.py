"""The comparison runner: ``tools/bench`` (or ``python -m benchmarks.compare``), as root.

    tools/bench                          full run (5 interleaved repetitions; under 15 minutes here)
    tools/bench --quick                  one repetition, smaller counts, no layerfs-flat and no check
                                         of what each implementation sees (under 2 minutes)
    tools/bench --only stat,read-warm    some workloads (names or groups: stat = stat-cold + stat-warm)
    tools/bench --impl overlay,layerfs   some implementations
    tools/bench --list                   the workloads and implementations

Prints the table of medians with ratios to kernel overlayfs and fuse-overlayfs, writes ``results.json``
(machine facts, versions, every sample) and ``chart.png`` to --out (default:
/var/tmp/layerfs-bench/results/DATE-TIME).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import data as data_mod
from . import report, workloads
from .impls import BY_NAME as IMPLS_BY_NAME
from .impls import IMPLS, Impl
from .runner import Runner
from .util import log
from .workspace import RUNS, Workspace


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one repetition, smaller counts (< 2 minutes)")
    p.add_argument("--only", metavar="W[,W]", help="workloads or workload groups to run")
    p.add_argument("--impl", metavar="I[,I]", help="implementations to run (default: all available)")
    p.add_argument("--reps", type=int, help="repetitions (default: 5, --quick 1)")
    p.add_argument("--out", type=Path, help="directory for results.json and chart.png")
    p.add_argument(
        "--data",
        choices=["auto", "debootstrap", "generated"],
        default="auto",
        help="bottom layer: debootstrap (falls back to generated under auto)",
    )
    p.add_argument("--cache", type=Path, default=data_mod.DEFAULT_CACHE, help="where the layers are cached")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached layers first")
    p.add_argument("--no-views", action="store_true", help="skip checking what each implementation sees")
    p.add_argument("--list", action="store_true", help="list workloads and implementations, then exit")
    return p


def _impls(spec: str | None) -> tuple[list[Impl], dict[str, str]]:
    names = [s.strip() for s in spec.split(",") if s.strip()] if spec else [i.name for i in IMPLS]
    unknown = [n for n in names if n not in IMPLS_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown implementation(s): {', '.join(unknown)}; known: {', '.join(IMPLS_BY_NAME)}")
    chosen, skipped = [], {}
    for impl in (IMPLS_BY_NAME[n] for n in names):
        why = impl.problem()
        if why:
            skipped[impl.name] = why
        else:
            chosen.append(impl)
    return chosen, skipped


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the workspace's cleanup


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for w in workloads.WORKLOADS:
            print(f"{w.name:<15} [{w.group}, {w.mode}] {w.doc}")
        print()
        for i in IMPLS:
            print(f"{i.name:<17} {i.problem() or i.version()}")
        return 0
    if os.geteuid() != 0:
        print("tools/bench: must run as root (it mounts filesystems and drops caches)", file=sys.stderr)
        return 2
    try:
        chosen_workloads = workloads.select(args.only)
    except ValueError as e:
        print(f"tools/bench: {e}", file=sys.stderr)
        return 2
    impls, skipped = _impls(args.impl)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    if not any(w.layered for w in chosen_workloads) or (args.quick and not args.impl):
        impls = [i for i in impls if not i.flat]  # --quick leaves the layering comparison out unless asked
    # A variant runs only in the workloads that name it: without one, it is not even mounted.
    impls = [i for i in impls if not i.variant or any(i.name in (w.impls or ()) for w in chosen_workloads)]
    scale = workloads.QUICK if args.quick else workloads.FULL
    out = args.out or RUNS / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    started = time.monotonic()
    if args.rebuild:
        data_mod.clear(args.cache)
    data = data_mod.ensure(args.cache, args.data)
    log(f"data: {data_mod.describe(data)}")
    versions = {i.name: i.version() for i in impls}
    load_before = os.getloadavg()
    try:
        with Workspace(data, native=any(i.kind == "native" for i in impls), flat=any(i.flat for i in impls)) as ws:
            commands = {
                i.name: " ".join(i.command(ws.lowers_for(i), Path("UPPER"), Path("WORK"), Path("MNT")))
                for i in impls
                if i.kind != "native"
            }
            log(
                f"running {len(chosen_workloads)} workloads x {len(impls)} implementations "
                f"({', '.join(i.name for i in impls)}), {args.reps or scale.reps} repetitions, interleaved"
            )
            results = Runner(
                ws, impls, chosen_workloads, scale, args.reps, views=not (args.no_views or args.quick)
            ).run()
    except KeyboardInterrupt:
        log("interrupted; everything it mounted is unmounted and its image removed")
        return 130
    results.skipped.update(skipped)
    duration = time.monotonic() - started

    notes = [
        "The machine is shared with other jobs: numbers are noisy; medians of interleaved passes.",
        "Warm data reads: this machine's VM evicts idle page cache within ~0.1-0.2 s, so 'warm' file data "
        "often comes from the host's cache; dentry/inode warmth is reliable.",
        "`layerfs diff` after N changes has its own benchmark: python -m benchmarks.diffbench.",
    ]
    if data.manifest["source"] != "debootstrap":
        notes.append(
            "The bottom layer is the generated tree (asked for, or debootstrap could not run); "
            "'start' does the lookups directly instead of running programs in a chroot."
        )
    title = (
        f"layerfs benchmarks ({scale.name}, {args.reps or scale.reps} reps, medians) - "
        f"{report.machine()['cpus']} CPUs, kernel {report.machine()['kernel']}, {data.manifest['source']} rootfs"
    )
    chart_problem = report.chart(results, out / "chart.png", title)
    report.write_json(
        results,
        out / "results.json",
        {
            "command": " ".join(["tools/bench"] + (argv if argv is not None else sys.argv[1:])),
            "scale": vars(scale) | {"reps": args.reps or scale.reps},
            "versions": versions,
            "mount_commands": commands,
            "data": {k: v for k, v in data.manifest.items() if k not in ("meta_files", "meta_dirs", "build_sources")},
            "loadavg_before": load_before,
            "duration_seconds": round(duration, 1),
            "notes": notes,
        },
    )

    print()
    print(title)
    print(report.table(results))
    print()
    layering = report.layering(results)
    if layering:
        print("Layering cost (layerfs over the 3 layers vs over the same content flattened into 1):")
        print("\n".join("  " + line for line in layering))
    upper = report.upper_table(results)
    if upper:
        print("\n".join(upper))
    print("Goals (layerfs):")
    for goal, verdict, detail in report.goals(results):
        print(f"  [{verdict}] {goal}" + (f": {detail}" if detail else ""))
    rss = report.rss_summary(results)
    if rss:
        print("FUSE daemon memory (RSS):")
        for impl, r in rss.items():
            parts = []
            if "first_mib" in r:
                parts.append(
                    f"long-lived daemon {r['first_mib']:.0f} MiB after {r['first_after']} -> "
                    f"{r['last_mib']:.0f} MiB after {r['last_after']} (max {r['max_mib']:.0f})"
                )
            if "fresh_peak_mib" in r:
                parts.append(f"fresh-mount daemons peak {r['fresh_peak_mib']:.0f} MiB")
            print(f"  {impl}: " + "; ".join(parts))
    views = report.views_summary(results)
    if views:
        print("What each implementation sees of the layers (vs overlayfs's rules):")
        print("\n".join("  " + line for line in views))
    errs = report.errors(results)
    if errs:
        print("Errors:")
        for w, by_impl in errs.items():
            for impl, e in by_impl.items():
                print(f"  {w} on {impl}: {e}")
    for name, why in results.skipped.items():
        print(f"Skipped {name}: {why}")
    for note in notes:
        print(f"Note: {note}")
    print(
        f"Wall time {duration:.0f}s (load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}). "
        f"Results: {out / 'results.json'}"
        + (f"; no chart: {chart_problem}" if chart_problem else f", chart: {out / 'chart.png'}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
