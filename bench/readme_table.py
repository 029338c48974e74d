"""python -m bench.readme_table [FILES...] [--readme README.md] [--print]

Renders the benchmark results as markdown tables (one per device and suite; the newest file wins for
a repeated case) and rewrites only the section of README.md between ``<!-- bench:start -->`` and
``<!-- bench:end -->``. Without FILES it reads the JSON files committed under bench/results/ (all of
them when this is not a git checkout). Where README.md has no markers the table is printed instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from . import agreement, report, trainer_step

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PROVIDER_ORDER = ("torch-eager", "torch-compile", "liger", "trl", "torchtune",
                  "distill_ops:cuda", "distill_ops:cuda-resident", "distill_ops:cuda-radix",
                  "distill_ops:triton",
                  "distill_ops:cpu", "distill_ops:torch", "distill_ops:torchtune")
SHORT_STATUS = {"oom": "OOM", "error": "error", "unavailable": "n/a", "missing": "missing",
                "skipped": "skipped"}


def committed_results() -> list:
    """The JSON files under bench/results/ that git tracks (every one there if git cannot say)."""
    results = report.RESULTS_DIR
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", str(results)], cwd=report.REPO_ROOT,
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            files = [report.REPO_ROOT / f for f in out.stdout.split("\0") if f.endswith(".json")]
            return sorted(files)
    except Exception:
        pass
    return sorted(results.glob("*.json"))


def _mem(mb) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


# A measured cell's mark for what its agreement check found (bench/agreement.py); the reference's
# cells and fully checked ones carry none.
AGREEMENT_MARK = {"reference": "", "checked": "", "unchecked": " †", "failed": " ✗"}
AGREEMENT_LEGEND = {
    "unchecked": "† not (fully) checked: a run from before the checks, or what the row's "
                 "`agreement.unchecked` says",
    "failed": "✗ differs beyond tolerance (the row's `agreement.failed`)",
}


def _cell(row: dict) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return SHORT_STATUS.get(row["status"], row["status"])
    parts = [f"{report.num(row['ms_median'])} ms"]
    if row.get("floor_fraction") is not None:
        parts.append(f"{row['floor_fraction']:.0%}")
    elif row.get("tflop_per_s") is not None:   # the linear suite is compute-bound
        parts.append(f"{row['tflop_per_s']:.3g} TFLOP/s")
    parts.append(_mem(row.get("peak_extra_mb")))
    text = " · ".join(parts)
    if row.get("shrunk"):
        text += f" (N={row['N']})"
    return text + AGREEMENT_MARK[agreement.state(row)]


def _agreement_legend(group: list, suite: str) -> str:
    """What the cells were checked against, and the marks the group's cells carry."""
    if suite == "sample":
        text = (f"Unmarked cells draw the ids and weights of {agreement.SAMPLE_REFERENCE}, the "
                "reference backend (same seed; bench/agreement.py), or are it; "
                "torch.multinomial's draws are comparable with nothing")
    else:
        text = (f"Unmarked cells agree with {agreement.REFERENCE} within tolerance "
                "(bench/agreement.py), or are it")
    states = {agreement.state(r) for r in group if r["status"] == "ok"}
    marks = [AGREEMENT_LEGEND[s] for s in ("unchecked", "failed") if s in states]
    return text + ("; " + "; ".join(marks) if marks else "") + "."


def _bandwidth_text(group: list) -> str:
    """The copy bandwidth the group's floor fractions were divided by. Each file has its own, and
    a group's cells may come from several files: one value where they agree to the digit shown,
    else the range (each cell used its own file's)."""
    values = sorted({round(r["copy_gb_per_s"]) for r in group
                     if r.get("copy_gb_per_s") and r.get("floor_fraction") is not None})
    if not values:
        return ""
    if len(values) == 1:
        return f"copy bandwidth {values[0]} GB/s"
    return f"copy bandwidth {values[0]}-{values[-1]} GB/s (by run; each cell uses its run's)"


def _order(name: str) -> tuple:
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER), name)


def render(paths) -> str:
    """The kernel suites' tables, then the trainer step's (bench/trainer_step.py)."""
    paths = list(paths)
    kernels = render_kernels(paths)
    trainer = trainer_step.render(paths)
    if trainer is None:
        return kernels
    return kernels + "\n" + trainer.rstrip() + "\n"


def render_kernels(paths) -> str:
    rows = report.latest(report.load_rows(paths))
    if not rows:
        return "_No benchmark results yet: run `python -m bench` and commit bench/results/*.json._\n"
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["device"], row["suite"]), []).append(row)
    out = []
    for (device, suite), group in sorted(groups.items()):
        newest = max(group, key=lambda r: r["date"])
        ver = newest.get("versions", {})
        bits = [f"torch {ver.get('torch')}"]
        for peer, key in (("liger", "liger_kernel"), ("trl", "trl"), ("torchtune", "torchtune")):
            if any(r["provider"] == peer and r["status"] == "ok" for r in group) and ver.get(key):
                bits.append(f"{peer} {ver[key]}")
        if newest.get("device_type") == "cuda":
            bits.append(f"triton {ver.get('triton')}")
            if newest.get("driver"):
                bits.append(f"driver {newest['driver']}")
        # A run from a working tree with uncommitted changes: its commit does not pin the code.
        commits = sorted({r["commit"][:10] + ("+uncommitted" if r.get("dirty") else "")
                          for r in group})
        bits.append("commit " + ", ".join(commits))
        bits.append(newest["date"][:10])
        if bandwidth := _bandwidth_text(group):
            bits.append(bandwidth)
        out.append(f"**{device}**, {suite} ({'; '.join(bits)})")
        out.append("")
        measured = sorted({r["provider"] for r in group if r["status"] in ("ok", "oom", "error")},
                          key=_order)
        absent = sorted({r["provider"] for r in group} - set(measured), key=_order)
        cases: dict = {}
        for r in group:
            key = (r["divergence"] + ("+ce" if r.get("hard_label") else ""), r["dtype"],
                   r.get("N_requested", r["N"]), r["V"],
                   r.get("H") if suite == "linear" else r.get("k"), r["mode"])
            cases.setdefault(key, {})[r["provider"]] = r
        has_k = any(key[4] is not None for key in cases)
        k_name = "H" if suite == "linear" else "k"
        head = ["loss", "dtype", "N", "V"] + ([k_name] if has_k else []) + ["mode"] + measured
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        for key in sorted(cases, key=lambda k: (k[0], k[1], k[3], k[2], k[4] or 0, k[5])):
            div, dtype, n, v, k, mode = key
            cells = [div, dtype, str(n), str(v)] + ([str(k or "")] if has_k else []) + [mode]
            cells += [_cell(cases[key].get(p)) for p in measured]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if suite == "linear":
            out.append("Cell: median time · GEMM throughput (the suite is compute-bound: "
                       "bench/inputs.py linear_flops) · peak extra memory. H: the student's "
                       "hidden size (the teacher's is 1.5 H).")
        else:
            out.append("Cell: median time · fraction of the bandwidth floor (bytes that must move "
                       "over the measured copy bandwidth) · peak extra memory.")
        out.append(_agreement_legend(group, suite))
        if absent:
            reasons = []
            for name in absent:
                sample = next(r for r in group if r["provider"] == name)
                why = (sample.get("error") or sample["status"]).split("\n")[0]
                reasons.append(f"{name} ({sample['status']}: {why[:120]})")
            out.append("Not measured: " + "; ".join(reasons) + ".")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, table: str) -> bool:
    """Replace the marked section; False (nothing written) when the file or a marker is missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[: start + len(START)] + "\n" + table + text[end:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="result JSON files (default: committed ones)")
    p.add_argument("--readme", type=Path, default=report.REPO_ROOT / "README.md")
    p.add_argument("--print", dest="print_only", action="store_true", help="print, write nothing")
    args = p.parse_args(argv)
    table = render(args.files or committed_results())
    if args.print_only or not update_readme(args.readme, table):
        if not args.print_only:
            print(f"({args.readme} has no {START} ... {END} section; the table:)", file=sys.stderr)
        sys.stdout.write(table)
    else:
        print(f"updated the benchmark section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
