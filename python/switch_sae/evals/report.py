"""``analyze_runs``: the report behind ``switch-sae analyze RUN_DIR...``.

For each run folder (a saved SAE, ``cfg.json`` + ``model.safetensors``, either in the folder
itself or in one subfolder such as ``final/``; optional metrics in ``metrics.json``,
``eval*.json`` or the last line of ``metrics.jsonl``) it computes the feature geometry of
the decoder and encoder directions, the expert-similarity matrix (a Switch SAE's experts, or
random blocks of a dense SAE as the paper's control), FLOPs and parameters, and, given
activations, the router statistics. It writes to ``out_dir``:

- ``report.json``: every number, per run;
- ``summary.md``: one table comparing the runs;
- PNGs: expert-similarity heatmaps, t-SNE scatters, expert load, and across runs (when the
  metrics exist) MSE vs L0, loss recovered vs L0, MSE vs training FLOPs, duplicates vs experts.

What it leaves out: computing MSE/L0/loss recovered (the eval step writes them; this reads them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from ..models.sharded import is_sharded
from ..utils.io import atomic_write, atomic_write_json
from ..utils.tables import fmt
from . import geometry, plots
from .experts import expert_stats
from .flops import count_parameters, flop_count

THRESHOLDS = (0.7, 0.8, 0.9, 0.95)
METRIC_FILES = ("metrics.json", "eval*.json")  # globs; later files override earlier ones
# Names other parts of the pipeline may use for the same quantity.
ALIASES = {
    "mse": ("mse",),
    "l0": ("l0",),
    "loss_recovered": ("loss_recovered", "loss_recovered_zero", "ce_loss_score", "frac_loss_recovered"),
    "tokens": ("tokens", "tokens_seen", "n_tokens", "train_tokens"),
    "batch_size": ("batch_size", "train_batch_size"),
}


def find_sae_dir(run_dir: Path) -> Path:
    """The folder holding the saved SAE: ``run_dir`` itself or its last such subfolder."""
    def is_sae(p: Path) -> bool:  # a plain folder, or the shards an expert-parallel run saved
        return is_sharded(p) or ((p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file() and not is_sharded(p.parent))

    if is_sae(run_dir):
        return run_dir
    for name in ("final", "sae"):
        if is_sae(run_dir / name):
            return run_dir / name
    found = sorted(p.parent for p in run_dir.rglob(WEIGHTS_FILE) if is_sae(p.parent))
    if not found:
        raise FileNotFoundError(f"{run_dir} contains no saved SAE ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return found[-1]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """Flat metrics of a run: last ``metrics.jsonl`` record, then the JSON files over it."""
    merged: dict[str, Any] = {}
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        if lines:
            merged.update(json.loads(lines[-1]))
    for path in (p for pattern in METRIC_FILES for p in sorted(run_dir.glob(pattern))):
        data = json.loads(path.read_text())
        merged.update(data.get("metrics", data) if isinstance(data, dict) else {})
    out = {}
    for key, names in ALIASES.items():
        for name in names:
            if isinstance(merged.get(name), (int, float)):
                out[key] = float(merged[name])
                break
    if isinstance(merged.get("expert_load"), list):
        out["expert_load"] = merged["expert_load"]
    return out


def _label(sae: SAE) -> str:
    """``topk``, ``switch-16``, ``switch-16-a2`` (two active experts): one plot series each."""
    if sae.architecture != "switch":
        return sae.architecture
    n_active = sae.cfg.n_active
    return f"switch-{sae.cfg.n_experts}" + (f"-a{n_active}" if n_active > 1 else "")


def _geometry(W: Tensor, d_expert: int, chunk_rows: int | None) -> dict[str, Any]:
    nn = geometry.nearest_neighbours(W, chunk_rows=chunk_rows)
    n_experts = W.shape[0] // d_expert
    groups = geometry.duplicate_groups(W, n_experts, 0.9, chunk_rows=chunk_rows)
    return {
        "nn_cos_mean": float(nn.cos.mean()),
        "nn_cos_median": float(nn.cos.median()),
        "duplicate_fraction": {str(t): geometry.duplicate_fraction(nn, t) for t in THRESHOLDS},
        "duplicate_groups_0.9": {
            "count": len(groups),
            "spanning_experts": sum(g.spans_experts for g in groups),
            "largest": max((len(g.features) for g in groups), default=0),
            "examples": [{"features": g.features[:8], "experts": g.experts[:8]} for g in groups[:5]],
        },
    }


def _analyze_one(
    run_dir: Path, name: str, out_dir: Path, control_experts: int, activations: Tensor | None, tsne: bool, chunk_rows: int | None
) -> dict[str, Any]:
    """Everything about one run; ``name`` prefixes its figures."""
    sae = SAE.load(find_sae_dir(run_dir), device="cpu")
    label = _label(sae)
    n_experts = getattr(sae.cfg, "n_experts", 1)
    W_dec, W_enc = geometry.directions(sae), geometry.encoder_directions(sae)
    metrics = read_metrics(run_dir)
    flops = flop_count(sae)
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "name": name,
        "label": label,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "n_experts": n_experts,
        "k": getattr(sae.cfg, "k", None),
        "parameters": count_parameters(sae),
        "flops": flops.to_dict(),
        "metrics": metrics,
        "decoder": _geometry(W_dec, sae.d_sae // n_experts, chunk_rows),
        "encoder": _geometry(W_enc, sae.d_sae // n_experts, chunk_rows),
    }
    if "tokens" in metrics:
        result["train_flops"] = flops.step_per_token(int(metrics.get("batch_size", 4096))) * metrics["tokens"]
    if n_experts > 1:
        sim = geometry.expert_similarity(W_dec, n_experts, chunk_rows=chunk_rows)
        result["expert_similarity"] = {"matrix": sim.tolist(), "off_diagonal_mean": geometry.off_diagonal_mean(sim)}
        plots.plot_expert_similarity(sim, out_dir / f"{name}_expert_similarity.png", title=f"{name}: expert similarity")
    elif control_experts > 1 and sae.d_sae % control_experts == 0:
        sim = geometry.random_block_similarity(W_dec, control_experts, chunk_rows=chunk_rows)
        result["random_block_similarity"] = {
            "n_blocks": control_experts,
            "matrix": sim.tolist(),
            "off_diagonal_mean": geometry.off_diagonal_mean(sim),
        }
    if activations is not None and n_experts > 1:
        with torch.no_grad():
            stats = expert_stats(sae, activations.split(4096))
        result["expert_stats"] = stats.to_dict()
        metrics["expert_load"] = stats.load
    if "expert_load" in metrics:
        plots.plot_expert_load(metrics["expert_load"], out_dir / f"{name}_expert_load.png", title=f"{name}: expert load")
    if tsne:
        for kind, W in (("decoder", W_dec), ("encoder", W_enc)):
            coords, ids = geometry.tsne_embedding(W, max_points=1000)
            plots.plot_tsne(coords, ids // (sae.d_sae // n_experts), out_dir / f"{name}_tsne_{kind}.png", title=f"{name}: {kind} directions by expert")
    return result


def _cross_run_plots(runs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    def points(*keys: str) -> list[dict[str, Any]]:
        rows = [{"label": r["label"], **r["metrics"], **{k: r[k] for k in ("train_flops",) if k in r}} for r in runs]
        return [row for row in rows if all(k in row for k in keys)]

    made = []
    for keys, fn, file in (
        (("l0", "mse"), plots.plot_mse_vs_l0, "mse_vs_l0.png"),
        (("l0", "loss_recovered"), plots.plot_loss_recovered_vs_l0, "loss_recovered_vs_l0.png"),
        (("train_flops", "mse"), plots.plot_mse_vs_flops, "mse_vs_flops.png"),
    ):
        if rows := points(*keys):
            made.append(fn(rows, out_dir / file).name)
    dup = [{"label": "decoder", "n_experts": r["n_experts"], "duplicate_fraction": r["decoder"]["duplicate_fraction"]["0.9"]} for r in runs]
    made.append(plots.plot_duplicate_fraction(dup, out_dir / "duplicate_fraction_vs_experts.png").name)
    return made


def _summary(runs: list[dict[str, Any]], figures: list[str]) -> str:
    lines = [
        "# switch_sae analysis",
        "",
        "Duplicates: fraction of decoder directions whose nearest other direction has cosine > 0.9. "
        "Expert similarity: mean over features of expert A of the max cosine to expert B, averaged over A != B "
        "(for a dense SAE: the same over random blocks, the paper's control).",
        "",
        "| run | arch | d_sae | experts | k | params | fwd FLOPs/token | MSE | L0 | loss rec. | dup@0.9 | NN cos | dup groups (across experts) | expert sim |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m, dec = r["metrics"], r["decoder"]
        sim = r.get("expert_similarity") or r.get("random_block_similarity") or {}
        sim_text = fmt(sim.get("off_diagonal_mean")) + (" (random blocks)" if "random_block_similarity" in r else "")
        groups = dec["duplicate_groups_0.9"]
        lines.append(
            f"| {r['name']} | {r['label']} | {r['d_sae']} | {r['n_experts']} | {fmt(r['k'])} | {r['parameters']} "
            f"| {r['flops']['forward_total']} | {fmt(m.get('mse'))} | {fmt(m.get('l0'))} | {fmt(m.get('loss_recovered'))} "
            f"| {dec['duplicate_fraction']['0.9']:.4f} | {dec['nn_cos_mean']:.3f} | {groups['count']} ({groups['spanning_experts']}) | {sim_text} |"
        )
    lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in sorted(figures)), ""]
    return "\n".join(lines)


def analyze_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    activations: Tensor | None = None,
    tsne: bool = True,
    chunk_rows: int | None = None,
) -> Path:
    """Analyse saved runs and write ``report.json``, ``summary.md`` and PNGs to ``out_dir``.

    Args:
        run_dirs: folders each holding one saved SAE (and optionally metrics files).
        out_dir: created if needed; returned.
        activations: optional ``[n_tokens, d_in]`` eval activations for router statistics.
        tsne: also draw t-SNE scatters of decoder and encoder directions (the slow part).
        chunk_rows: features per similarity chunk (default: a 128 MiB budget).
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty: pass at least one run folder")
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"run directory {d} does not exist")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Random-block control for dense SAEs: as many blocks as the widest Switch run has experts.
    n_experts = [json.loads((find_sae_dir(d) / CONFIG_FILE).read_text()).get("n_experts", 1) for d in dirs]
    control = max(n_experts) if max(n_experts) > 1 else 16
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # e.g. several runs/*/sae: keep their figures apart
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    runs = [_analyze_one(d, n, out_dir, control, activations, tsne, chunk_rows) for d, n in zip(dirs, names)]
    figures = sorted(p.name for p in out_dir.glob("*.png"))
    figures = sorted(set(figures) | set(_cross_run_plots(runs, out_dir)))
    atomic_write_json({"runs": runs, "figures": figures}, out_dir / "report.json")
    text = _summary(runs, figures)
    atomic_write(out_dir / "summary.md", lambda tmp: Path(tmp).write_text(text))
    return out_dir
