"""PNG plots of benchmark records: step time against n_experts, and where the time goes.

What it leaves out: tables (``report.py``).
"""

from __future__ import annotations

from pathlib import Path

from .cases_ops import OP_NAMES

STEP_SERIES = (  # (name, variant, label)
    ("switch_sae", None, "switch_sae (routed ops)"),
    ("dense_mask_reference", None, "dense-and-mask reference"),
    ("saelens_topk", "flop_matched", "sae-lens TopK, one expert's width"),
    ("dictlearning_topk", "flop_matched", "dictionary-learning TopK, one expert's width"),
    ("routed_gemm_limit", None, "routed encoder GEMM alone (torch.mm)"),
)
WIDTH_LINES = (("saelens_topk", "sae-lens TopK, full width"), ("dictlearning_topk", "dictionary-learning TopK, full width"))


def _ok(records: list[dict], name: str, variant: str | None = None) -> list[dict]:
    return [r for r in records if r["name"] == name and r.get("status") == "ok" and r.get("variant") == variant]


def plot_step_times(records: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, variant, label in STEP_SERIES:
        rows = sorted(_ok(records, name, variant), key=lambda r: r["n_experts"])
        if not rows:
            continue
        xs = [r["n_experts"] for r in rows]
        ys = [r["median_ms"] for r in rows]
        spread = [[y - r["q25_ms"] for y, r in zip(ys, rows)], [r["q75_ms"] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=label)
    for name, label in WIDTH_LINES:
        for r in _ok(records, name, "width_matched"):
            ax.axhline(r["median_ms"], linestyle="--", color="grey" if "sae-lens" in label else "tab:brown", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n_experts (d_sae fixed)")
    ax.set_ylabel("training step, median ms")
    ax.set_title("Training step time (forward + backward + Adam)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_breakdown(records: list[dict], path: Path) -> Path:
    """Left: per-op time, ours vs reference. Right: phases of our training step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["n_experts"] for r in _ok(records, "op_dispatch", "switch_sae")})
    fig, (ax_ops, ax_phase) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, 2 * len(experts))
    for j, n in enumerate(experts):
        for v, variant in enumerate(("switch_sae", "reference")):
            ys = []
            for op in OP_NAMES:
                rec = [r for r in _ok(records, f"op_{op}", variant) if r["n_experts"] == n]
                ys.append(rec[0]["median_ms"] if rec else 0.0)
            offset = (2 * j + v) * width
            ax_ops.bar([i + offset for i in range(len(OP_NAMES))], ys, width,
                       label=f"{variant}, E={n}", hatch="" if variant == "switch_sae" else "//")
    ax_ops.set_xticks([i + 0.4 - width / 2 for i in range(len(OP_NAMES))], OP_NAMES, rotation=20, fontsize=8)
    ax_ops.set_yscale("log")
    ax_ops.set_ylabel("median ms per call")
    ax_ops.set_title("Custom ops vs reference ops")
    if experts:
        ax_ops.legend(fontsize=6, ncol=2)

    steps = sorted(_ok(records, "switch_sae"), key=lambda r: r["n_experts"])
    bottom = [0.0] * len(steps)
    for phase in ("forward", "backward", "optimizer"):
        ys = [r["phases_ms"][phase] for r in steps]
        ax_phase.bar([str(r["n_experts"]) for r in steps], ys, bottom=bottom, label=phase)
        bottom = [b + y for b, y in zip(bottom, ys)]
    gemm = {r["n_experts"]: r["median_ms"] for r in _ok(records, "routed_gemm_limit")}
    ax_phase.plot([str(r["n_experts"]) for r in steps if r["n_experts"] in gemm],
                  [gemm[r["n_experts"]] for r in steps if r["n_experts"] in gemm], "k_", markersize=30,
                  label="routed GEMM alone")
    ax_phase.set_xlabel("n_experts")
    ax_phase.set_ylabel("median ms")
    ax_phase.set_title("switch_sae training step by phase")
    ax_phase.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(records: list[dict], folder: Path) -> list[Path]:
    """Write step_time.png and breakdown.png into ``folder``; skipped without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_step_times(records, folder / "step_time.png"), plot_breakdown(records, folder / "breakdown.png")]
