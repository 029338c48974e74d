"""The run's header (device, versions, commit, date), the JSON file, and the stdout summary."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from . import agreement

SCHEMA = "distill-ops-bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMIT_ENV = "DISTILL_OPS_COMMIT"


def _run(cmd, cwd=None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict:
    """The commit measured: $DISTILL_OPS_COMMIT if set, else git rev-parse HEAD, else 'unknown'."""
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return {"commit": env, "commit_source": "env", "dirty": None}
    head = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if not head:
        return {"commit": "unknown", "commit_source": "unknown", "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": head, "commit_source": "git", "dirty": bool(status) if status is not None else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info.update(
            name=torch.cuda.get_device_name(device),
            driver=smi.splitlines()[0].strip() if smi else None,
            cuda_runtime=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 1e9, 1),
            sm_count=props.multi_processor_count,
            l2_mb=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1) or None,
        )
    else:
        info.update(name=info["cpu"], driver=None)
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    from .providers import package_version

    out["liger_kernel"] = package_version("liger-kernel")
    out["trl"] = package_version("trl")
    out["torchtune"] = package_version("torchtune")
    try:
        import distill_ops

        out["distill_ops"] = getattr(distill_ops, "__version__", "unknown")
        from distill_ops.backends import native

        ok, why = native.available("cpu")
        out["distill_ops_native"] = {"cpu": ok, "cuda": native.available("cuda")[0],
                                     "why_not": None if ok else why}
    except Exception as exc:
        out["distill_ops"] = f"not importable ({exc})"
    return out


def loadavg() -> Optional[list]:
    """1/5/15-minute load averages: other work on the machine makes CPU timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_path(device: dict, suite: str, quick: bool, when: _dt.datetime) -> Path:
    name = device["name"] if device["type"] == "cuda" else f"cpu-{device['name']}-{device['torch_threads']}t"
    stamp = when.strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{stamp}_{slug(name)}_{suite}{'-quick' if quick else ''}.json"


def header(device: torch.device, suite: str, quick: bool, argv: list, settings: dict) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "suite": suite,
        "quick": quick,
        "argv": argv,
        "date": now.isoformat(timespec="seconds"),
        **git_commit(),
        "device": device_info(device),
        "versions": versions(),
        "settings": settings,
        "copy_bandwidth": None,
        "loadavg_start": loadavg(),
        "rows": [],
    }


def output_path(out_arg: Optional[str], default: Path) -> Path:
    """--out: None keeps the default path; a directory (existing, or written with a trailing /)
    gets the default file name; anything else is the file."""
    if out_arg is None:
        return default
    is_dir = Path(out_arg).is_dir() or out_arg.endswith(("/", "\\"))
    return Path(out_arg) / default.name if is_dir else Path(out_arg)


def write(doc: dict, path: Path) -> None:
    """Write atomically (the file is rewritten after every row: a killed run keeps its rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- stdout summary

def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def num(value, none: str = "-") -> str:
    """Three significant digits, without exponents for ordinary magnitudes."""
    if value is None:
        return none
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


AGREE_SHORT = {"reference": "ref", "checked": "ok", "failed": "FAIL", "unchecked": "unchecked"}


def _probes_text(bw: dict) -> str:
    """' (before the rows; after the rows 37, fresh destination 4.1)': the other probes, where
    the file has them (the first value is the one floor fractions use)."""
    bits = []
    for key, name in (("after", "after the rows"), ("fresh", "fresh destination")):
        value = (bw.get(key) or {}).get("gb_per_s")
        if value is not None:
            bits.append(f"{name} {value:.3g}")
    return f" (before the rows; {', '.join(bits)})" if bits else ""


def summary(doc: dict) -> str:
    """A plain-text table of every row (the errors shortened)."""
    cols = ["case", "provider", "N", "ms", "min-max", "GB/s", "floor", "peak MB", "1st s", "agree",
            "status"]
    lines = []
    for r in doc["rows"]:
        div = r["divergence"] + ("+ce" if r.get("hard_label") else "")
        case = f"{r['suite']} {div} {r['dtype']} V={r['V']} {r['mode']}"
        n = f"{r['N']}" + ("*" if r.get("shrunk") else "")
        status = r["status"]
        if status != "ok" and r.get("error"):
            status += ": " + r["error"].replace("\n", " ")[:70]
        elif failed := agreement.failures_text(r):
            status += f" ({failed})"
        elif r.get("loss_vs_eager") is not None and r["loss_vs_eager"] > 1e-2:
            status += f" (loss differs from eager by {r['loss_vs_eager']:.1e})"
        spread = (f"{num(r['ms_min'])}-{num(r['ms_max'])}" if r.get("ms_min") is not None else "-")
        lines.append([case, r["provider"], n, num(r["ms_median"]), spread,
                      num(r["gb_per_s"]), _fmt(r["floor_fraction"], ".0%"),
                      _fmt(r["peak_extra_mb"], ".0f"), _fmt(r["first_call_s"], ".1f"),
                      AGREE_SHORT[agreement.state(r)] if r["status"] == "ok" else "-", status])
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    out = []
    dev = doc["device"]
    bw = doc.get("copy_bandwidth") or {}
    out.append(f"# {dev.get('name')} | torch {doc['versions'].get('torch')} | triton "
               f"{doc['versions'].get('triton')} | commit {doc['commit'][:12]} | copy bandwidth "
               f"{_fmt(bw.get('gb_per_s'), '.0f')} GB/s{_probes_text(bw)}")
    out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    out.append("(N* = shrunk to fit memory; floor = achieved GB/s over the measured copy bandwidth; "
               "agree: ref = the reference, ok = every check within tolerance, FAIL = a check "
               "above it, unchecked = something was not compared (the row's agreement says what)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- reading results

def device_label(dev: dict) -> str:
    """The device a row was measured on, as tables group rows: its name, and for a CPU run on
    fewer threads than the machine has (--threads), that count, so that such a run is neither
    mixed with nor taken for the all-core rows."""
    name = dev.get("name", "?")
    threads, cores = dev.get("torch_threads"), dev.get("cpu_count")
    if dev.get("type") == "cpu" and threads and cores and threads < cores:
        name += f" ({threads} of {cores} threads)"
    return name


def load_rows(paths) -> list:
    """Every row of the given result files, each tagged with its file's device, date and commit."""
    rows = []
    for path in paths:
        doc = load(path)
        if doc.get("schema") != SCHEMA:
            continue
        dev = doc.get("device", {})
        for row in doc.get("rows", []):
            tagged = dict(row)
            tagged.update(device=device_label(dev), device_type=dev.get("type"),
                          date=doc.get("date", ""), commit=doc.get("commit", "unknown"),
                          dirty=doc.get("dirty"),
                          file=str(path), copy_gb_per_s=(doc.get("copy_bandwidth") or {}).get("gb_per_s"),
                          versions=doc.get("versions", {}), driver=dev.get("driver"))
            rows.append(tagged)
    return rows


def row_key(row: dict) -> tuple:
    return (row["device"], row["suite"], row["divergence"], bool(row.get("hard_label")),
            row["dtype"], row.get("N_requested", row["N"]), row["V"], row.get("k"), row["mode"],
            row["provider"])


def latest(rows: list) -> list:
    """One row per (device, case, provider): the newest file's, preferring a measured row to a
    skipped one of the same date."""
    best: dict = {}
    rank = {"ok": 3, "oom": 2, "error": 2, "unavailable": 1, "missing": 1, "skipped": 0}
    for row in rows:
        key = row_key(row)
        score = (row["date"], rank.get(row["status"], 0))
        if key not in best or score >= best[key][0]:
            best[key] = (score, row)
    return [row for _, row in best.values()]


def main(argv=None) -> int:
    """python -m bench.report FILE... : print the summary table of result files."""
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m bench.report RESULT.json ...")
        return 2
    for path in paths:
        print(summary(load(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
