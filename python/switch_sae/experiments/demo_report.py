"""The comparison table, the two demo plots and ``report.md`` of ``switch-sae demo``.

``comparison.png`` puts the three SAEs side by side (MSE, loss recovered, training step time)
and ``training_curves.png`` shows their MSE per step; both are labelled by SAE name, which the
cross-run plots of ``analysis/`` (labelled by architecture) cannot tell apart.

What it leaves out: computing the numbers (``demo.py``, ``evals``) and the geometry plots
(``evals.report.analyze_runs``, written to ``analysis/``).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_write

# (header, row key, format) of each column; a None value prints as "-".
COLUMNS = (
    ("SAE", "name", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("experts", "n_experts", "{}"),
    ("FLOPs/tok", "flops_per_token", "{:.3g}"),
    ("MSE", "mse", "{:.4g}"),
    ("FVE", "fve", "{:.3f}"),
    ("L0", "l0", "{:.1f}"),
    ("unseen", "unseen_fraction", "{:.1%}"),
    ("floor", "unseen_floor", "{:.1%}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("LR zero", "loss_recovered", "{:.3f}"),
    ("LR mean", "loss_recovered_mean", "{:.3f}"),
    ("KL", "kl", "{:.4f}"),
    ("load max/min", "expert_load", "{}"),
    ("dup@0.9", "duplicate_fraction", "{:.2%}"),
    ("step ms", "step_ms", "{:.0f}"),
    ("tok/s", "tokens_per_s", "{:.0f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == "expert_load":  # experts' shares of tokens: 1/n_experts each when balanced
        if row.get("expert_load_max") is None:
            return "-"
        return f"{row['expert_load_max']:.2f}/{row['expert_load_min']:.2f}"
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False, columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """The comparison table: aligned plain text, or a Markdown table; ``columns`` as ``COLUMNS``."""
    headers = [h for h, _, _ in columns]
    cells = [[_cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


LEGEND = """\
- **MSE**: squared reconstruction error summed over d_in, mean over tokens; **FVE**: fraction of variance explained.
- **L0**: active features per token, counted on the sparse code.
- **unseen**: features that never fired on the eval tokens; **floor**: the unseen fraction a perfectly healthy SAE would
  show on as many tokens, (1 - L0/d_sae)^tokens (unseen near the floor means the eval set is too small to tell).
  **dead**: features silent over 10 d_sae / L0 tokens (a healthy feature is missed with odds e^-10), from the eval
  tokens when there are that many, else from the training run's dead-latent tracker; "-" when neither saw enough tokens.
- **LR zero / LR mean**: fraction of the next-token cross-entropy loss recovered when the reconstruction is patched in,
  relative to patching zeros / the mean activation: (CE_ablated - CE_sae) / (CE_ablated - CE_clean).
- **KL**: KL divergence of the patched model's next-token distribution from the clean one (nats per token).
- **load max/min**: the largest and smallest share of tokens routed to one expert (balanced = 1/experts).
- **dup@0.9**: fraction of decoder directions whose nearest other direction has cosine > 0.9 (paper, sec. 4.3).
- **FLOPs/tok**: forward FLOPs per token of the SAE; **step ms / tok/s**: median measured training step time and throughput.
"""


PANELS = (("mse", "MSE (lower is better)"), ("loss_recovered", "loss recovered, zero abl. (higher is better)"),
          ("step_ms", "training step, ms (lower is better)"))
COLOURS = ("C1", "C0", "C2")  # the same colour per SAE in both figures


def write_plots(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """``comparison.png`` and ``training_curves.png`` in ``out``."""
    from ..evals.plots import plt  # the Agg backend is selected there

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        ax.bar(names, [r[key] for r in rows], color=COLOURS[: len(rows)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in zip(names, COLOURS):
        steps = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ax.plot([m["step"] for m in steps], [m["mse"] for m in steps], label=name, color=colour, linewidth=1)
    ax.set(xlabel="step", ylabel="training MSE", yscale="log", title="Training curves (same batches for all)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)
    return [out / "comparison.png", out / "training_curves.png"]


def write_report(out: Path, cfg: Any, rows: list[dict[str, Any]], table: str, seconds: float) -> Path:
    """Write ``out/report.md``: setup, the table, the legend and links to the plots."""
    figures = write_plots(out, rows) + sorted((out / "analysis").glob("*.png"))
    figures = [p.relative_to(out) for p in figures]
    text = "\n".join([
        "# switch_sae demo: Switch SAEs vs a TopK SAE",
        "",
        f"Model `{cfg.model}`, hook `{cfg.hook_name}`, text `{cfg.dataset}`; preset `{cfg.preset}`.",
        f"Every SAE trained on the same {cfg.steps()} batches of {cfg.batch_size} activations "
        f"({cfg.epochs} pass(es) over {cfg.train_tokens} tokens) with k={cfg.k} and {cfg.lr_scale:g}x the paper's "
        "learning rate, and evaluated on the same "
        f"{cfg.eval_contexts} held-out contexts of {cfg.context_size} tokens.",
        f"`switch-flop`: {cfg.n_experts} experts each as wide as the TopK SAE (FLOP-matched); "
        f"`switch-width`: the TopK SAE's {cfg.d_sae} features split over {cfg.n_experts} experts (width-matched).",
        "",
        format_table(rows, markdown=True),
        "",
        LEGEND,
        f"Wall time {seconds:.0f} s on {cfg.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}).",
        "",
        "## Figures",
        "",
        *[f"![{f.stem}]({f.as_posix()})" for f in figures],
        "",
        "More numbers (geometry, FLOPs, expert similarity): [analysis/summary.md](analysis/summary.md); "
        "per-SAE evaluations: `<sae>/eval.json`; training curves: `<sae>/metrics.jsonl`.",
        "",
    ])
    path = out / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
