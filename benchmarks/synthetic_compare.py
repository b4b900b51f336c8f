"""Switch SAEs (width-matched and FLOP-matched) against a TopK SAE on clustered synthetic data,
each trained with the library's default recipe (``TrainConfig(total_steps=...)`` and
nothing else), so the figures say what a new user gets.

The data: 8 clusters of 32 ground-truth features in 64 dimensions, 3 active per token,
all of a token's features from one cluster (the regime where routing can help). Every model
sees the same batch stream and is scored on the same held-out tokens in raw units (the
trained model as ``fit`` leaves it): FVU, L0, latents that fired on the held-out tokens,
recovery of the ground-truth features, and for Switch SAEs the router's health (balance
statistic ``n_experts * sum f_i P_i``, mean p_max). ``--scales 0.01,1,100`` repeats the
run on the data multiplied by each factor: a units-free recipe gives the same numbers.

    python benchmarks/synthetic_compare.py            # about 4 minutes on 2 cores
    -> benchmarks/results/synthetic_compare.json and a markdown table on stdout

What it leaves out: language-model activations (``switch-sae demo`` and ``reproduce``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import switch_sae
from switch_sae import SwitchSAE, TopKSAE, TopKSAEConfig, TrainConfig, Trainer
from switch_sae.activations import SyntheticActivations, SyntheticConfig, mean_max_cosine
from switch_sae.evals import flops
from switch_sae.models import losses

DATA = SyntheticConfig(d_in=64, n_features=256, n_clusters=8, features_per_token=3)


def build(name: str, k: int, width: int, n_experts: int) -> switch_sae.SAE:
    """``topk``, ``switch-flop`` or ``switch-width`` of ``flops.matched_configs`` (the demo's trio)."""
    cfg = flops.matched_configs(TopKSAEConfig(d_in=DATA.d_in, d_sae=width, k=k), n_experts)[name]
    return SwitchSAE(cfg) if name.startswith("switch-") else TopKSAE(cfg)


@torch.no_grad()
def score(model: switch_sae.SAE, x: torch.Tensor, data: SyntheticActivations, scale: float) -> dict:
    model.eval()
    out = model(x)
    fired = torch.bincount(out.code.indices[out.code.values != 0], minlength=model.d_sae) > 0
    cos = (data.features @ model.W_dec_flat.T).max(dim=1).values
    result = {
        "fvu": losses.fvu(x, out.x_hat).item(),
        "mse_unit_scale": losses.mse(x, out.x_hat).item() / scale**2,
        "l0": (out.code.values != 0).sum(-1).float().mean().item(),
        "fired_fraction": fired.float().mean().item(),
        "d_sae": model.d_sae,
        "mean_max_cosine": mean_max_cosine(model.W_dec_flat, data.features),
        "found_at_0.9": (cos > 0.9).float().mean().item(),
    }
    if out.router_probs is not None:
        result["balance"] = losses.load_balancing(out.router_probs, out.experts).item()
        result["p_max"] = losses.router_p_max(out.router_probs).item()
    return result


def run(name: str, scale: float, args, data: SyntheticActivations, eval_x: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = build(name, args.k, args.width, args.n_experts)
    trainer = Trainer(model, TrainConfig(total_steps=args.steps, progress=False, seed=args.seed))
    batches = [b * scale for b in data.batches(args.batch_size, args.steps, seed=args.seed + 1)]
    start = time.perf_counter()
    last = trainer.fit(batches)  # on return the model takes raw activations
    seconds = time.perf_counter() - start
    result = score(model, eval_x * scale, data, scale)
    result.update(scale=scale, steps=args.steps, tokens=args.steps * args.batch_size,
                  train_seconds=round(seconds, 1), trainer_dead=last.n_dead, final_loss=last.loss)
    return result


def table(results: list[dict]) -> str:
    lines = ["| SAE | scale | d_sae | FVU | L0 | fired | found@0.9 | balance | p_max | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        router = f"{r['balance']:.3f} | {r['p_max']:.2f}" if "balance" in r else "- | -"
        lines.append(f"| {r['name']} | {r['scale']:g} | {r['d_sae']} | {r['fvu']:.4f} | {r['l0']:.1f} | "
                     f"{r['fired_fraction']:.2f} | {r['found_at_0.9']:.2f} | {router} | {r['train_seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--width", type=int, default=512, help="TopK d_sae; the FLOP-matched expert width")
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--scales", default="1", help="comma-separated factors the data is multiplied by")
    parser.add_argument("--models", default="topk,switch-width,switch-flop")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthetic_compare.json"))
    args = parser.parse_args()
    data = SyntheticActivations(DATA)
    eval_x = data.sample(args.eval_tokens, torch.Generator().manual_seed(10_000 + args.seed)).x
    results = []
    for scale in map(float, args.scales.split(",")):
        for name in args.models.split(","):
            results.append({"name": name, **run(name, scale, args, data, eval_x)})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    report = {"args": vars(args), "data": vars(DATA), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.platform(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
