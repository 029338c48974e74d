"""python -m bench [dense|sparse|topk|sample|all] [--device cuda|cpu] [--quick] [--V ...] [--N ...] ...

Runs the plan (config.py), one row per (case, provider), writes bench/results/<date>_<device>_<suite>.json
(rewritten after every row) and prints a summary table to stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import agreement, config, inputs, measure, providers, report
from .runner import Runner


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="dense", choices=config.SUITES + ("all",))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="GPU: bf16 V=128256 N=8192 and N=256, forward_kl + jsd, fwdbwd, every "
                        "provider; then, while the time budget lasts, V=151936/262144 at N=4096 "
                        "for the distill_ops kernels and the sparse/topk/sample rows")
    p.add_argument("--V", nargs="+", help="vocabulary sizes (space- or comma-separated)")
    p.add_argument("--N", nargs="+", help="rows (tokens)")
    p.add_argument("--dtype", nargs="+", help="bf16 fp16 fp32")
    p.add_argument("--mode", nargs="+", help="fwd bwd fwdbwd")
    p.add_argument("--divergence", nargs="+",
                   help="dense: " + " ".join(config.DIVERGENCES) + ", each optionally with +ce "
                        "(hard label; default per preset, the CPU forward_kl); sparse: "
                        + " ".join(config.SPARSE_DIVERGENCES) + " (default forward_kl); "
                        "linear: " + " ".join(config.LINEAR_DIVERGENCES))
    p.add_argument("--k", nargs="+", help="sparse/topk: k; sample: the number of samples")
    p.add_argument("--H", type=int, default=None,
                   help="linear: the student's hidden size (the teacher's is 1.5x; default 2048 "
                        "on a GPU, 256 on the CPU)")
    p.add_argument("--providers", nargs="+",
                   help="torch-eager torch-compile liger distill_ops:triton distill_ops:cuda "
                        "distill_ops:cuda-resident distill_ops:cpu distill_ops:torch (default: "
                        "per suite and device)")
    p.add_argument("--out", default=None,
                   help="JSON path, or a directory for the automatic name "
                        "(default bench/results/<date>_<device>_<suite>.json)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip optional cases once this many seconds have passed "
                        f"(--quick on a GPU: {config.QUICK_GPU_BUDGET_S:.0f})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA warm-up per row")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA timed reps per row (ms)")
    p.add_argument("--min-reps", type=int, default=None, help="default: 10 (CUDA), 5 (CPU)")
    p.add_argument("--rep-s", type=float, default=3.0, help="CPU timed reps per row (s)")
    p.add_argument("--copy-mb", type=float, default=None,
                   help="bytes of the copy-bandwidth probe (default 1024 MiB CUDA, 256 MiB CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu)")
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or measure.default_threads())

    cases = config.build_plan(
        args.suite, device.type, args.quick,
        V=config.split_list(args.V, int), N=config.split_list(args.N, int),
        dtype=config.split_list(args.dtype), mode=config.split_list(args.mode),
        divergence=config.split_list(args.divergence), k=config.split_list(args.k, int),
        H=args.H,
    )
    chosen = config.split_list(args.providers)
    cache: dict = {}

    def providers_for(case):
        names = chosen or case.providers or config.default_providers(case.suite, device.type)
        if case.providers and chosen:
            names = [n for n in chosen if n in case.providers]
        return [cache.setdefault(n, providers.get(n)) for n in names]

    budget = args.budget_s
    if budget is None and args.quick and device.type == "cuda":
        budget = config.QUICK_GPU_BUDGET_S

    if device.type == "cuda":
        timer = measure.CudaTimer(device, args.warmup_ms, args.rep_ms,
                                  min_reps=args.min_reps or 10)
        timing = ("CUDA events per call, L2 flushed before each, gradients reset outside the "
                  f"timing, warm-up {args.warmup_ms:g} ms, reps for {args.rep_ms:g} ms "
                  f"(at least {args.min_reps or 10})")
        memory = ("torch.cuda.max_memory_allocated during one call minus memory_allocated before "
                  "it (reset_peak_memory_stats first)")
    else:
        timer = measure.CpuTimer(rep_s=args.rep_s, min_reps=args.min_reps or 5)
        timing = (f"time.perf_counter per call, 1 warm-up call, reps for {args.rep_s:g} s "
                  f"(at least {args.min_reps or 5}), {torch.get_num_threads()} threads")
        memory = measure.cpu_memory_method()
    settings = {
        "temperature": providers.TEMPERATURE, "jsd_beta": providers.JSD_BETA,
        "skew_alpha": providers.SKEW_ALPHA,
        "hard_weight": providers.HARD_WEIGHT, "reduction": "batchmean (mean over rows)",
        "logit_scale": inputs.LOGIT_SCALE, "timing": timing, "memory": memory,
        "budget_s": budget,
        "bytes": "fwd: read student+teacher once; fwdbwd: + write the gradient once; bwd: the "
                 "gradient write; input dtype; sparse divergences other than forward_kl read the "
                 "student at the k target ids only (see bench/inputs.py floor_bytes)",
        "rotation": (f"inputs rotate among copies exceeding twice the "
                     f"{'L2' if device.type == 'cuda' else 'last-level cache'} "
                     f"({measure.rotation_cache_bytes(device) / 2 ** 20:.0f} MiB), at most "
                     f"{inputs.MAX_COPIES} copies and {inputs.ROTATION_CAP_BYTES / 2 ** 30:.0f} "
                     "GiB in all (a row's input_copies)"),
        "agreement": {"reference": agreement.REFERENCE, "checks": agreement.CHECKS,
                      "loss_tol": agreement.LOSS_TOL, "grad_tol": agreement.GRAD_TOL,
                      "grad_tol_mixtures_add": agreement.MIXTURE_GRAD_ALLOWANCE,
                      "mixtures": agreement.MIXTURES,
                      "topk_ids_tol": agreement.TOPK_IDS_TOL,
                      "topk_values_tol": agreement.TOPK_VALUES_TOL,
                      "sample_reference": agreement.SAMPLE_REFERENCE,
                      "sample_check_rows": agreement.SAMPLE_CHECK_ROWS},
        "copy_bandwidth": (f"floor_fraction uses the warm probe made before the rows "
                           f"(copy_bandwidth.{measure.FLOOR_PROBE}); after, spread and a "
                           "fresh-destination probe are recorded beside it"),
        "linear": "hidden states and lm_head weights in, the teacher's hidden size 1.5x the "
                  "student's; compute-bound, rows report tflop_per_s (bench/inputs.py "
                  "linear_flops)",
    }
    suite_name = args.suite
    doc = report.header(device, suite_name, args.quick, list(sys.argv[1:] if argv is None else argv),
                        settings)
    when = report._dt.datetime.fromisoformat(doc["date"])
    out = report.output_path(args.out, report.default_path(doc["device"], suite_name, args.quick,
                                                           when))

    copy_bytes = None if args.copy_mb is None else int(args.copy_mb * 2 ** 20)
    doc["copy_bandwidth"] = measure.copy_probes_before(device, timer, copy_bytes)
    report.write(doc, out)

    began = time.monotonic()

    def on_row(rows):
        doc["rows"] = rows
        doc["elapsed_s"] = time.monotonic() - began
        doc["loadavg_end"] = report.loadavg()
        report.write(doc, out)

    runner = Runner(device, timer, budget_s=budget, progress=not args.no_progress, on_row=on_row,
                    copy_gb_per_s=doc["copy_bandwidth"]["gb_per_s"])
    runner.run(cases, providers_for)
    measure.add_probe_after(doc["copy_bandwidth"], device, timer, copy_bytes)
    timer.close()
    on_row(runner.rows)
    print(report.summary(doc))
    print(f"wrote {out}")
    doc["path"] = str(out)
    return doc


if __name__ == "__main__":
    main()
