"""Turning samples into the printed table, issue 3's goals, the PNG chart and the JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from .runner import Results

BASELINES = {"overlay": "/ overlay", "overlay-metacopy": "/ ovl-meta", "fuse-overlayfs": "/ fuse-ovl"}  # ratio rows
AS_FAST_AS_FUSE_OVERLAYFS = (
    "open-close",
    "create-delete",
    "untar",
    "meta-mix",
    "build-mix",
    "start",
    "stat-warm",
    "smallwrite",
    "podman-build",
    "stat-cold",
    "read-cold",
)
DATA = ("read-cold", "read-warm", "seqread-cold", "seqread-warm", "randread", "seqwrite", "smallwrite", "copyup")
LAYERED = ("stat-cold", "stat-warm", "read-cold", "read-warm")
MiB = 1 << 20


def medians(results: Results, measure: str = "seconds") -> dict[str, dict[str, float]]:
    """workload -> impl -> median of a sample's ``measure`` (seconds, upper_bytes...) over its passes;
    implementations without one left out."""
    out: dict[str, dict[str, float]] = {}
    for w in results.workloads:
        for i in results.impls:
            values = [getattr(s, measure) for s in results.samples if s.workload == w and s.impl == i]
            values = [v for v in values if v is not None]
            if values:
                out.setdefault(w, {})[i] = statistics.median(values)
    return out


def errors(results: Results) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for s in results.samples:
        if s.error:
            out.setdefault(s.workload, {}).setdefault(s.impl, s.error)
    return out


def ratio(med: dict[str, dict[str, float]], w: str, a: str, b: str) -> float | None:
    row = med.get(w, {})
    return row[a] / row[b] if a in row and b in row and row[b] > 0 else None


def _t(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f}s"
    if seconds >= 1:
        return f"{seconds:.2f}s"
    if seconds >= 0.001:
        return f"{seconds * 1000:.3g}ms"
    return f"{seconds * 1e6:.3g}us"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: Results) -> str:
    """Medians, then each one's ratio to kernel overlayfs (with metacopy=on too, where it ran) and to
    fuse-overlayfs, a block per workload."""
    med, err = medians(results), errors(results)
    impls = [i for i in results.impls if i not in results.skipped]
    width = max(14, *(len(w) for w in results.workloads))
    col = {i: max(9, len(i) + 1) for i in impls}  # the variants' long names widen their own columns only
    lines = [f"{'workload':<{width}}" + "".join(f"{i:>{col[i]}}" for i in impls)]
    for w in results.workloads:
        row = med.get(w, {})
        cells = []
        for i in impls:
            if i in row:
                cells.append(_t(row[i]))
            elif i in err.get(w, {}):
                cells.append("error")
            elif i in results.inapplicable.get(w, ()):
                cells.append("—")
            else:
                cells.append("")
        lines.append(f"{w:<{width}}" + "".join(f"{c:>{col[i]}}" for i, c in zip(impls, cells, strict=True)))
        for base, label in BASELINES.items():
            if base in row:
                lines.append(
                    f"{'  ' + label:<{width}}"
                    + "".join(f"{_r(ratio(med, w, i, base)) if i in row else '':>{col[i]}}" for i in impls)
                )
    if any(i in impls for names in results.inapplicable.values() for i in names):
        lines.append("— : the workload cannot run on that implementation")
    return "\n".join(lines)


def layering(results: Results) -> list[str]:
    med = medians(results)
    out = []
    for w in LAYERED:
        r = ratio(med, w, "layerfs", "layerfs-flat")
        if r is not None:
            out.append(
                f"{w}: layerfs over 3 layers {_t(med[w]['layerfs'])}, over 1 layer "
                f"{_t(med[w]['layerfs-flat'])}: {r:.2f}x"
            )
    return out


def upper_table(results: Results) -> list[str]:
    """For each workload that measures it: every implementation's median time next to the median bytes and
    entries its passes left in the upper layer, and those bytes as a share of the directory it changed."""
    med, size, entries = medians(results), medians(results, "upper_bytes"), medians(results, "upper_entries")
    lines = []
    for w, ref in results.upper_reference.items():
        where = "/" + ref["path"]
        lines += [
            f"{w}: upper layer bytes per implementation (medians; {where} in the merged view: "
            f"{ref['bytes'] / MiB:.1f} MiB, {ref['entries']:,} entries)",
            f"  {'':<18}{'time':>9}{'upper MiB':>11}{'% of ' + where:>11}{'entries':>9}",
        ]
        for i in [i for i in results.impls if i in med.get(w, {})]:
            if i in size.get(w, {}):
                cells = f"{size[w][i] / MiB:>11.1f}{size[w][i] / ref['bytes']:>11.1%}{entries[w][i]:>9,.0f}"
            else:
                cells = f"{'—':>11}{'—':>11}{'—':>9}"  # no upper layer: the plain directory
            lines.append(f"  {i:<18}{_t(med[w][i]):>9}{cells}")
    return lines


def rss_summary(results: Results) -> dict[str, dict]:
    """Per FUSE implementation: its long-lived daemon's RSS first/last/max, and the fresh daemons' peak."""
    out = {}
    for impl in results.impls:
        main = [r for r in results.rss if r.impl == impl and r.mount == "main"]
        fresh = [r for r in results.rss if r.impl == impl and r.mount == "fresh"]
        if not main and not fresh:
            continue
        entry: dict = {}
        if main:
            entry.update(
                first_mib=main[0].rss_kib / 1024,
                last_mib=main[-1].rss_kib / 1024,
                max_mib=max(r.rss_kib for r in main) / 1024,
                first_after=main[0].workload,
                last_after=main[-1].workload,
                samples=len(main),
            )
        if fresh:
            entry["fresh_peak_mib"] = max(r.hwm_kib for r in fresh) / 1024
        out[impl] = entry
    return out


def goals(results: Results) -> list[tuple[str, str, str]]:
    """The performance goals (issue 13's, issue 3's on layering, and the metacopy issue's on chown -R), each
    (goal, met / missed / not measured, the numbers)."""
    med = medians(results)
    out: list[tuple[str, str, str]] = []

    def check(goal: str, pairs: list[tuple[str, str, str, float]], values: dict | None = None) -> None:
        # pairs: (workload, impl a, impl b, limit on a/b); values: medians of seconds unless told
        got = [(w, ratio(med if values is None else values, w, a, b), b, lim) for w, a, b, lim in pairs]
        measured = [(w, r, b, lim) for w, r, b, lim in got if r is not None]
        if not measured:
            out.append((goal, "not measured", ""))
            return
        detail = ", ".join(f"{w} {r:.2f}x {b}" for w, r, b, lim in measured)
        met = all(r <= lim for _, r, _, lim in measured)
        partial = len(measured) < len(got)
        out.append((goal, ("met" if met else "missed") + (" (partly measured)" if partial else ""), detail))

    check(
        "at least as fast as fuse-overlayfs", [(w, "layerfs", "fuse-overlayfs", 1.0) for w in AS_FAST_AS_FUSE_OVERLAYFS]
    )
    check(
        "data workloads within 1.2x of kernel overlayfs (passthrough)", [(w, "layerfs", "overlay", 1.2) for w in DATA]
    )
    check("3 layers within 1.3x of 1 layer on stat and read", [(w, "layerfs", "layerfs-flat", 1.3) for w in LAYERED])
    # chown -R is metacopy=on's workload: layerfs mounted with it is judged, against the kernel's with it.
    check(
        "chown-r with metacopy=on at least 2x faster than fuse-overlayfs",
        [("chown-r", "layerfs-metacopy", "fuse-overlayfs", 0.5)],
    )
    check(
        "chown-r with metacopy=on within 1.5x of kernel overlayfs metacopy=on",
        [("chown-r", "layerfs-metacopy", "overlay-metacopy", 1.5)],
    )
    check(
        "chown-r with metacopy=on no slower than kernel overlayfs metacopy=on (moonshot)",
        [("chown-r", "layerfs-metacopy", "overlay-metacopy", 1.0)],
    )
    check(
        "chown-r with metacopy=on leaves an upper layer no larger than 1.5x kernel overlayfs metacopy=on's",
        [("chown-r", "layerfs-metacopy", "overlay-metacopy", 1.5)],
        medians(results, "upper_bytes"),
    )
    rss = rss_summary(results).get("layerfs", {})
    if "first_mib" in rss and rss.get("samples", 0) > 1:
        grew = rss["last_mib"] - rss["first_mib"]
        flat = grew <= max(10.0, 0.1 * rss["first_mib"])
        out.append(
            (
                "daemon memory flat over the run (long-lived daemon's RSS after its last pass <= after its "
                "first + max(10 MiB, 10%))",
                "met" if flat else "missed",
                f"RSS {rss['first_mib']:.0f} MiB after {rss['first_after']} -> {rss['last_mib']:.0f} MiB after "
                f"{rss['last_after']} (max {rss['max_mib']:.0f} MiB)",
            )
        )
    else:
        out.append(("daemon memory flat over the run", "not measured", ""))
    return out


def views_summary(results: Results) -> list[str]:
    lines = []
    for impl, v in results.views.items():
        if "error" in v:
            lines.append(f"{impl}: could not scan: {v['error']}")
        elif v["identical"]:
            lines.append(f"{impl}: exactly the merged view ({v['entries']} entries)")
        else:
            names = {"c": "char devices", "d": "directories", "f": "files", "l": "symlinks"}
            kinds = ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(v["extra_by_kind"].items()))
            examples = "; ".join(f"{what}: {', '.join(paths[:2])}" for what, paths in v["examples"].items() if paths)
            lines.append(
                f"{impl}: {v['entries']} entries for {v['expected']}: {v['extra']} extra ({kinds}), "
                f"{v['missing']} missing, {v['kind_differs']} of another type, "
                f"{v['size_differs']} of another size (e.g. {examples})"
            )
    return lines


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "uname": " ".join(platform.uname()),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def chart(results: Results, path: Path, title: str) -> str | None:
    """A grouped bar chart (log scale): a bar per implementation per workload, whiskers min..max.
    Returns why it was not drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (tools/setup --bench installs it)"
    med = medians(results)
    impls = [i for i in results.impls if any(i in row for row in med.values())]
    workloads = [w for w in results.workloads if w in med]
    if not workloads:
        return "nothing was measured"
    fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(workloads) + 3), 6.5))
    width = 0.8 / len(impls)
    colors = {
        "native": "#888888",
        "overlay": "#1f77b4",
        "overlay-metacopy": "#aec7e8",
        "fuse-overlayfs": "#2ca02c",
        "unionfs": "#9467bd",
        "layerfs": "#d62728",
        "layerfs-metacopy": "#ff7f0e",
        "layerfs-flat": "#ff9896",
    }
    for k, impl in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            if impl not in med[w]:
                continue
            times = [s.seconds for s in results.samples if s.workload == w and s.impl == impl and s.seconds]
            xs.append(j + (k - (len(impls) - 1) / 2) * width)
            ys.append(med[w][impl])
            lo.append(med[w][impl] - min(times))
            hi.append(max(times) - med[w][impl])
        ax.bar(
            xs, ys, width, label=impl, color=colors.get(impl), yerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8}
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, rotation=30, ha="right")
    ax.set_ylabel("seconds (median; whiskers min-max; log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(ncol=len(impls), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_json(results: Results, path: Path, extra: dict) -> None:
    med = medians(results)
    ratios = {w: {i: {b: ratio(med, w, i, b) for b in BASELINES if b in med[w]} for i in med[w]} for w in med}
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        **extra,
        "medians_seconds": med,
        "ratios": ratios,
        "medians_upper_bytes": medians(results, "upper_bytes"),
        "errors": errors(results),
        "goals": [{"goal": g, "verdict": v, "detail": d} for g, v, d in goals(results)],
        "rss": rss_summary(results),
        "results": results.to_json(),
    }
    path.write_text(json.dumps(record, indent=1, default=str))
