"""Loss-curve plots from metrics rows (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(runs: Mapping[str, Sequence[dict]], path: str, *, title: str = "",
                 hlines: Optional[Mapping[str, float]] = None) -> str:
    """Two panels: training loss per step, held-out perplexity per step, one line per run.
    ``hlines`` adds horizontal reference lines to the perplexity panel (e.g. the teacher's)."""
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        train = [r for r in rows if "loss" in r]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        evals = [r for r in rows if "eval_ppl" in r]
        if evals:
            ax_ppl.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], marker="o",
                        label=name)
    for name, value in (hlines or {}).items():
        ax_ppl.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax_ppl.annotate(f"{name} {value:.1f}", xy=(0.01, value), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize=8, color="gray")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training objective per token")
    ax_loss.set_title("training objective (KD: divergence + hard term; CE: cross-entropy)",
                      fontsize=9)
    ax_ppl.set_xlabel("optimizer step")
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_title("held-out perplexity (lower is better)")
    ax_ppl.set_yscale("log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
