"""Switch SAEs (width-matched and FLOP-matched) vs a TopK SAE at the same k, on synthetic data.

Every model is trained with the same recipe (``switch_sae.Trainer`` defaults plus the
options below) on the same batch stream, then scored on the same held-out tokens:
MSE (summed over d_in), FVU, L0 from the code, dead latents (never fired on the held-out
set, and the trainer's own dead count), recovery of the ground-truth features (mean max
cosine; share found at cosine > 0.9) and training steps/s.

    python benchmarks/synthetic_compare.py --steps 2000
    -> benchmarks/results/synthetic_compare.json

What it leaves out: language-model activations (the synthetic data has clusters so that
routing matters, which is the regime the comparison is about) and plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import switch_sae
from switch_sae import SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig, TrainConfig, Trainer
from switch_sae.data import SyntheticActivations, SyntheticConfig, mean_max_cosine
from switch_sae.training import losses
from switch_sae.training.dead import fired_latents


def build(name: str, d_in: int, k: int, width: int, n_experts: int, flop_experts: int):
    if name == "topk":
        return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=width, k=k))
    if name == "switch_width_matched":  # same total features, n_experts times fewer encoder FLOPs
        return SwitchSAE(SwitchSAEConfig(d_in=d_in, n_experts=n_experts, d_expert=width // n_experts, k=k))
    if name == "switch_flop_matched":  # each expert as wide as the TopK SAE: same encoder FLOPs
        return SwitchSAE(SwitchSAEConfig(d_in=d_in, n_experts=flop_experts, d_expert=width, k=k))
    raise ValueError(f"unknown model {name!r}")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, data: SyntheticActivations, chunk: int = 2048) -> dict:
    model.eval()
    outs = [model(part) for part in x.split(chunk)]
    x_hat = torch.cat([o.x_hat for o in outs])
    fired = torch.stack([fired_latents(o, model.d_sae) for o in outs]).any(0)
    l0 = torch.cat([(o.code.values != 0).sum(-1) for o in outs]).float().mean()
    cos = (data.features @ model.W_dec_flat.T).max(dim=1).values
    return {
        "mse": losses.mse(x, x_hat).item(),
        "fvu": losses.fvu(x, x_hat).item(),
        "l0": l0.item(),
        "dead_on_eval_set": int((~fired).sum()),
        "d_sae": model.d_sae,
        "mean_max_cosine": mean_max_cosine(model.W_dec_flat, data.features),
        "found_at_0.9": (cos > 0.9).float().mean().item(),
    }


def run(name: str, args, data: SyntheticActivations, eval_x: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = build(name, data.cfg.d_in, args.k, args.width, args.n_experts, args.flop_experts)
    cfg = TrainConfig(
        total_steps=args.steps,
        lr=args.lr,
        normalize_inputs=True,
        dead_after_tokens=args.dead_after_tokens,
        auxk=not args.no_auxk,
        auxk_coefficient=args.auxk_coefficient,
        lb_alpha=args.lb_alpha,
        progress=False,
        seed=args.seed,
    )
    trainer = Trainer(model, cfg)
    stream = data.batches(args.batch_size, args.steps, seed=args.seed + 1)
    batches = list(stream)  # sampled up front so the timing is training only
    start = time.perf_counter()
    for batch in batches:
        last = trainer.step(batch)
    seconds = time.perf_counter() - start
    # evaluate in raw units, as a user would after save_model (scale folded into the weights)
    with tempfile.TemporaryDirectory() as tmp:
        folded = switch_sae.SAE.load(trainer.save_model(Path(tmp) / name))
    result = evaluate(folded, eval_x, data)
    result.update(
        steps=args.steps,
        train_seconds=seconds,
        steps_per_s=args.steps / seconds,
        tokens_per_s=args.steps * args.batch_size / seconds,
        trainer_dead=last.n_dead,
        final_lb=last.lb,
        n_parameters=sum(p.numel() for p in model.parameters()),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=8, help="active features per token (true L0 is 8)")
    parser.add_argument("--width", type=int, default=2048, help="TopK d_sae; FLOP-matched expert width")
    parser.add_argument("--n-experts", type=int, default=16, help="experts of the width-matched Switch SAE")
    parser.add_argument("--flop-experts", type=int, default=8, help="experts of the FLOP-matched Switch SAE (paper: 8)")
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(d_sae / 2^14)")
    parser.add_argument("--dead-after-tokens", type=int, default=200_000)
    parser.add_argument("--no-auxk", action="store_true", help="train without AuxK, as the paper did")
    parser.add_argument("--auxk-coefficient", type=float, default=1 / 32)
    parser.add_argument("--lb-alpha", type=float, default=3.0)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="topk,switch_width_matched,switch_flop_matched")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthetic_compare.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = SyntheticActivations(SyntheticConfig())
    eval_x = data.sample(args.eval_tokens, torch.Generator().manual_seed(10_000 + args.seed)).x
    results = {}
    for name in args.models.split(","):
        results[name] = run(name, args, data, eval_x)
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}), flush=True)
    report = {
        "args": vars(args),
        "data": vars(data.cfg),
        "torch": torch.__version__,
        "switch_sae_extension": switch_sae.ops.HAS_EXTENSION,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
