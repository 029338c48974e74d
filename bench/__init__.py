"""distill-ops benchmark harness: ``python -m bench --help``.

One idea per module:

  config.py        sweeps, presets (``--quick``) and the plan: a list of cases
  inputs.py        the inputs of a case, and the bytes that must move (the bandwidth floor)
  providers.py     what is measured: eager PyTorch, torch.compile, Liger-Kernel, distill_ops backends
  measure.py       timers (CUDA events / perf_counter), peak extra memory, copy bandwidth
  runner.py        one row per (case, provider); failures and OOM become rows, never crashes
  report.py        the run's header (device, versions, commit), the JSON file, the stdout summary
  plots.py         ``python -m bench.plots results/*.json --out bench/plots/``
  readme_table.py  ``python -m bench.readme_table``: the README's benchmark section
"""
