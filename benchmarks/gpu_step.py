"""GPU benchmark of one Switch SAE training step: compiled kernels vs the PyTorch twins.

    python benchmarks/gpu_step.py                  # cuda, d_in 512, d_sae 2^16, batch 4096
    python benchmarks/gpu_step.py --device cpu --quick

First validates: the step's loss and every parameter gradient on the compiled kernels
must match the same step with ``ops.use_backend("reference")`` on 256 tokens (exit 1
otherwise, before anything is timed). Then times forward + backward + Adam for each backend (CUDA events
bracketed by synchronisation, median of ``--repeats``) and writes a JSON record per
backend. ``benchmarks/gpu_check.sh`` runs it as its last step.

What it leaves out: the peer libraries and the op-by-op breakdown (``switch-sae bench``,
CPU), and memory measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from switch_sae import SwitchSAE, SwitchSAEConfig, ops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=1 << 16)
    parser.add_argument("--n-experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats: a smoke test")
    parser.add_argument("--out", default="benchmarks/results/gpu_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_in, args.d_sae, args.n_experts, args.k, args.batch, args.repeats = 32, 256, 4, 4, 128, 3
    return args


def step(model: SwitchSAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = (model(x).x_hat - x).pow(2).sum(-1).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def gradients(model: SwitchSAE, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = (model(x).x_hat - x).pow(2).sum(-1).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def validate(model: SwitchSAE, x: torch.Tensor) -> None:
    loss, grads = gradients(model, x)
    with ops.use_backend("reference"):
        ref_loss, ref_grads = gradients(model, x)
    bad = [n for n in ref_grads if not torch.allclose(grads[n], ref_grads[n], rtol=1e-3, atol=1e-4)]
    if abs(loss - ref_loss) > 1e-4 * max(1.0, abs(ref_loss)) or bad:
        sys.exit(f"gpu_step: validation failed: loss {loss} vs reference {ref_loss}; gradients differ: {bad}")


def time_backend(backend: str, model: SwitchSAE, x: torch.Tensor, repeats: int) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with ops.use_backend(backend):
        step(model, optimizer, x)  # warm-up: allocator, cuBLAS handles
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            step(model, optimizer, x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return {"name": "switch_sae_step", "backend": backend, "device": str(x.device), "median_ms": median,
            "min_ms": min(times), "max_ms": max(times), "tokens_per_s": x.shape[0] / median * 1e3}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not ops.HAS_EXTENSION:
        sys.exit("gpu_step: the compiled extension is not installed (make install)")
    torch.manual_seed(0)
    cfg = SwitchSAEConfig(d_in=args.d_in, n_experts=args.n_experts, d_expert=args.d_sae // args.n_experts,
                          k=args.k, device=args.device)
    model = SwitchSAE(cfg)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    # A small batch: near-ties at the k-th feature may legitimately resolve differently
    # under another summation order, and each such token changes a few gradient rows.
    validate(model, x[:256])
    shape = {"d_in": args.d_in, "d_sae": args.d_sae, "n_experts": args.n_experts, "k": args.k, "batch": args.batch}
    records = [{**time_backend(b, model, x, args.repeats), **shape} for b in ("extension", "reference")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    for r in records:
        print(f"{r['backend']:<10} {r['median_ms']:9.2f} ms/step  {r['tokens_per_s']:12.0f} tokens/s")
    print(f"results: {out}")
    return records


if __name__ == "__main__":
    main()
