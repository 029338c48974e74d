"""python -m bench.plots bench/results/*.json --out bench/plots/

For each device, suite, loss, dtype and mode: time and peak extra memory against V (one figure per
N) and against N (one per V), one line per provider; where a run has a single shape (e.g. --quick),
bars per provider instead. The newest file wins for a repeated case. Rows that did not run are not
plotted (they are in the JSON and the README table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import report
from .readme_table import _order


def _series(rows, x_key):
    by_provider: dict = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    for name in sorted(by_provider, key=_order):
        pts = sorted(by_provider[name], key=lambda r: r[x_key])
        yield name, pts


def _line_figure(plt, rows, x_key, title, path):
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in _series(rows, x_key):
        xs = [p[x_key] for p in pts]
        label = name + (" (N shrunk)" if any(p.get("shrunk") for p in pts) else "")
        ax_t.plot(xs, [p["ms_median"] for p in pts], marker="o", label=label)
        ax_m.plot(xs, [(p["peak_extra_mb"] or 0) / 1024 for p in pts], marker="o", label=label)
    for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (GB)")):
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_figure(plt, rows, title, path):
    rows = sorted(rows, key=lambda r: _order(r["provider"]))
    names = [r["provider"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.bar(names, [r["ms_median"] for r in rows], color="tab:blue")
    ax_m.bar(names, [(r["peak_extra_mb"] or 0) / 1024 for r in rows], color="tab:orange")
    ax_t.set_ylabel("median time (ms)")
    ax_m.set_ylabel("peak extra memory (GB)")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(paths, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in report.latest(report.load_rows(paths)) if r["status"] == "ok"]
    groups: dict = {}
    for r in rows:
        div = r["divergence"] + ("+ce" if r.get("hard_label") else "")
        k = f"k{r['k']}" if r.get("k") else ""
        groups.setdefault((r["device"], r["suite"], div + k, r["dtype"], r["mode"]), []).append(r)
    written = []
    for (device, suite, div, dtype, mode), group in sorted(groups.items()):
        stem = report.slug(f"{device}_{suite}_{div}_{dtype}_{mode}")
        title = f"{device} | {suite} {div} {dtype} {mode}"
        plotted = set()
        by_n: dict = {}
        by_v: dict = {}
        for r in group:
            by_n.setdefault(r.get("N_requested", r["N"]), []).append(r)
            by_v.setdefault(r["V"], []).append(r)
        for n, sub in sorted(by_n.items()):
            if len({r["V"] for r in sub}) >= 2:
                path = out_dir / f"{stem}_n{n}_vs_v.png"
                _line_figure(plt, sub, "V", f"{title} | N={n}", path)
                written.append(path)
                plotted.update(id(r) for r in sub)
        for v, sub in sorted(by_v.items()):
            if len({r["N"] for r in sub}) >= 2:
                path = out_dir / f"{stem}_v{v}_vs_n.png"
                _line_figure(plt, sub, "N", f"{title} | V={v}", path)
                written.append(path)
                plotted.update(id(r) for r in sub)
        singles: dict = {}
        for r in group:
            if id(r) not in plotted:
                singles.setdefault((r.get("N_requested", r["N"]), r["V"]), []).append(r)
        for (n, v), sub in sorted(singles.items()):
            path = out_dir / f"{stem}_n{n}_v{v}.png"
            _bar_figure(plt, sub, f"{title} | N={n} V={v}", path)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "plots")
    args = p.parse_args(argv)
    written = make_plots(args.files, args.out)
    for path in written:
        print(path)
    if not written:
        print("no measured rows to plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
