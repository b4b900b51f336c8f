"""Feature geometry of Switch SAEs vs a TopK SAE trained on the same synthetic activations.

Trains (with ``switch_sae.training.Trainer``, the paper's recipe + AuxK) a TopK SAE and Switch
SAEs of the same total width (width-matched) and one FLOP-matched Switch SAE on ``switch_sae.activations.synthetic`` activations,
scores each on one held-out batch (MSE, L0, ground-truth recovery), then runs
``switch_sae.evals.analyze_runs`` on all of them: duplicate fraction, duplicate groups,
expert-similarity matrices (random-block control for the TopK SAE), t-SNE, plots.

    python benchmarks/geometry_synthetic.py [--steps 800] [--models topk switch8 ...] [--out DIR]

Outputs go to ``--out`` (ignored by git): one run folder per SAE and ``report/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from switch_sae.activations.synthetic import SyntheticActivations, SyntheticConfig, mean_max_cosine
from switch_sae.evals.experts import expert_stats
from switch_sae.evals.flops import flop_matched_config, width_matched_config
from switch_sae.evals.report import analyze_runs
from switch_sae.models import SwitchSAE, TopKSAE, TopKSAEConfig
from switch_sae.training import TrainConfig, Trainer
from switch_sae.utils.io import atomic_write_json


def models(d_in: int, d_sae: int, k: int) -> dict[str, object]:
    topk = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    return {
        "topk": TopKSAE(topk),
        "switch8": SwitchSAE(width_matched_config(topk, 8)),
        "switch16": SwitchSAE(width_matched_config(topk, 16)),
        "switch16_active2": SwitchSAE(width_matched_config(topk, 16, n_active=2)),
        # FLOP-matched: every expert as wide as the TopK SAE, 8x the features.
        "switch8_flop": SwitchSAE(flop_matched_config(topk, 8)),
    }


@torch.no_grad()
def score(sae, data: SyntheticActivations, x: torch.Tensor) -> dict[str, float]:
    sae.eval()
    out = sae(x)
    result = {
        "mse": float((out.x_hat - x).square().sum(-1).mean()),
        "l0": float((out.code.values > 0).sum(-1).float().mean()),
        "fvu": float((out.x_hat - x).square().sum() / (x - x.mean(0)).square().sum()),
        "gt_mean_max_cosine": mean_max_cosine(sae.W_dec_flat, data.features),
    }
    if isinstance(sae, SwitchSAE):
        stats = expert_stats(sae, x.split(4096))
        result |= {"expert_load": stats.load, "router_entropy": stats.router_entropy, "balance_loss": stats.balance_loss}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/geometry_synthetic")
    parser.add_argument("--models", nargs="*", help="subset of the model names to train (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    data = SyntheticActivations(SyntheticConfig(d_in=64, n_features=2000, n_clusters=16, features_per_token=8))
    held_out = data.sample(8192, torch.Generator().manual_seed(12345)).x
    run_dirs, summary = [], {}
    for name, sae in models(64, args.d_sae, args.k).items():
        if args.models and name not in args.models:
            continue
        run_dir = out / name
        cfg = TrainConfig(total_steps=args.steps, run_dir=str(run_dir), progress=False, log_every=50, seed=0)
        start = time.perf_counter()
        Trainer(sae, cfg).fit(data.batches(args.batch, args.steps, seed=1))
        metrics = score(sae, data, held_out) | {"train_seconds": time.perf_counter() - start, "tokens": args.steps * args.batch, "batch_size": args.batch}
        atomic_write_json(metrics, run_dir / "eval.json")
        summary[name] = {k: v for k, v in metrics.items() if k != "expert_load"}
        print(name, json.dumps(summary[name]))
        run_dirs.append(run_dir)
    report = analyze_runs(run_dirs, out / "report", activations=held_out)
    print((report / "summary.md").read_text())


if __name__ == "__main__":
    main()
