"""At how many training tokens does a FLOP-matched Switch SAE overtake TopK on a real model?

The paper's result (FLOP-matched Switch MSE below TopK's) comes from 820M training tokens;
the demo's CPU budget is 262k. This sweep trains the same trio as the demo (TopK, its
FLOP-matched and its width-matched Switch SAE, ``evals.flops.make_saes``) with the default
recipe on growing prefixes of one activation cache, one pass each, and scores every SAE on
the same held-out tail of the cache. Each budget starts from fresh initialisations, so a row
is what a run of that length gives, learning-rate decay included.

    switch-sae reproduce --keep-activations --out runs/reproduce      # a 1.2M-token cache
    python benchmarks/ordering_vs_tokens.py runs/reproduce/activations --tokens 262144 524288 1048576

The table (MSE, FVE, the training tracker's dead fraction per SAE and token budget) goes to
stdout and, with the raw rows, to ``--out`` (default ``runs/ordering_vs_tokens``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from switch_sae.activations.buffer import ShufflingBuffer
from switch_sae.activations.cache import ActivationCache
from switch_sae.evals import flops
from switch_sae.evals.metrics import ReconstructionMetrics
from switch_sae.models import TopKSAEConfig
from switch_sae.training import TrainConfig, Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("activations", type=Path, help="an activation cache folder (switch-sae ... --keep-activations)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[262144, 524288, 1048576],
                        help="training-token budgets, each a prefix of the cache")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens at the end of the cache")
    parser.add_argument("--d-sae", type=int, default=4096, help="TopK width (each FLOP-matched expert's too)")
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr-scale", type=float, default=3.0, help="multiple of the paper's learning rate (the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/ordering_vs_tokens"))
    return parser.parse_args()


def batches(rows: torch.Tensor, batch_size: int, seed: int):
    """One shuffled pass over ``rows`` in ``[batch_size, d_in]`` float32 batches, as the demo feeds them."""
    chunks = rows.split(16 * batch_size)
    return ShufflingBuffer(chunks, capacity=16 * batch_size, batch_size=batch_size, seed=seed, drop_last=True,
                           dtype=torch.float32)


@torch.no_grad()
def score(sae, held_out: torch.Tensor) -> dict[str, float]:
    metrics = ReconstructionMetrics(held_out.shape[1], sae.d_sae)
    for x in held_out.float().split(4096):
        metrics.update(x, sae(x))
    result = metrics.result()
    return {"mse": result.mse, "fve": result.fve, "l0": result.l0}


def main() -> None:
    args = parse_args()
    cache = ActivationCache(args.activations)
    needed = max(args.tokens) + args.eval_tokens
    if len(cache) < needed:
        raise SystemExit(f"{args.activations} holds {len(cache)} tokens; the largest budget plus the held-out "
                         f"tail needs {needed}")
    held_out = cache[len(cache) - args.eval_tokens:]
    meta = {"hook_name": cache.spec.hook_name, "model_name": cache.spec.model_name}
    baseline = TopKSAEConfig(d_in=cache.d_in, d_sae=args.d_sae, k=args.k, **meta)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for tokens in args.tokens:
        train_rows = cache[:tokens]
        for name, sae in flops.make_saes(baseline, args.n_experts, seed=args.seed).items():
            steps = tokens // args.batch_size
            lr = args.lr_scale * TrainConfig(total_steps=1).peak_lr(sae.encoder_width)
            run_dir = args.out / f"{name}-{tokens}"
            trainer = Trainer(sae, TrainConfig(total_steps=steps, lr=lr, seed=args.seed, run_dir=str(run_dir),
                                               progress=False))
            start = time.perf_counter()
            trainer.fit(batches(train_rows, args.batch_size, args.seed))
            seconds = time.perf_counter() - start
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            row = {"sae": name, "tokens": tokens, "d_sae": sae.d_sae, **score(sae, held_out),
                   "dead_fraction": last["n_dead"] / sae.d_sae, "train_s": round(seconds, 1)}
            rows.append(row)
            print(f"{name:>13} {tokens:>8} tokens: MSE {row['mse']:8.1f}  FVE {row['fve']:.3f}  "
                  f"dead {row['dead_fraction']:6.1%}  ({seconds:.0f} s)", flush=True)
    table = ["| SAE | tokens | d_sae | MSE | FVE | dead (tracker) |", "|---|---|---|---|---|---|"]
    table += [f"| {r['sae']} | {r['tokens']:,} | {r['d_sae']} | {r['mse']:.0f} | {r['fve']:.3f} | {r['dead_fraction']:.1%} |"
              for r in rows]
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=1))
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
