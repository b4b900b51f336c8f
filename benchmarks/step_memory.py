"""Peak memory and time of one training step of ``SwitchSAE`` against the dense reference.

A step is forward + MSE loss + backward (no optimiser). "sparse" runs ``SwitchSAE.forward``
(the custom ops: dispatch, tiled encode_topk, gather-sum decode, sparse backward);
"dense" runs ``reference.switch_forward`` on the same parameters (every expert encodes
every token, ``[batch, d_sae]`` pre-activations, then masking: the paper's reference
computation). Both are first checked to give the same loss and gradients.

Memory, two ways:
* ``peak_alloc_MiB``: peak of the bytes torch allocated during the step beyond those live
  before it (inputs, parameters), from the profiler's allocation events: exact, and blind
  to how the C allocator caches pages.
* ``peak_rss_MiB``: rise of the process's peak resident set over one step in a fresh
  subprocess (``measure.peak_memory``), a cross-check that includes
  threads' scratch and allocator overhead.
Time: ``measure.time_calls`` (median and spread after one warm-up).

    python benchmarks/step_memory.py            # writes benchmarks/results/step_memory.json

What it leaves out: the optimiser step and the other peers (``benchmarks/run.py`` times
full training steps of every implementation), CUDA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import switch_sae
from switch_sae import SwitchSAE, SwitchSAEConfig, reference
from measure import peak_memory, time_calls  # the runner's measurements; run as a script, this folder is on the path

VARIANTS = ("sparse", "dense")
MIB = 2**20


def build(args: argparse.Namespace) -> tuple[SwitchSAE, torch.Tensor]:
    torch.manual_seed(0)
    cfg = SwitchSAEConfig(d_in=args.d_in, n_experts=args.n_experts, d_expert=args.d_expert, k=args.k,
                          n_active=args.n_active, tile_rows=args.tile_rows)
    return SwitchSAE(cfg), torch.randn(args.batch, args.d_in)  # x: [batch, d_in]


def step(variant: str, model: SwitchSAE, x: torch.Tensor) -> torch.Tensor:
    """Forward, MSE loss, backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    if variant == "sparse":
        x_hat = model(x).x_hat  # [batch, d_in]
    else:
        m, cfg = model, model.cfg
        x_hat = reference.switch_forward(x, m.W_enc, m.b_enc, m.W_dec, m.W_router, m.b_router, m.b_dec,
                                         cfg.k, cfg.n_active)[0]
    loss = (x_hat - x).pow(2).sum(-1).mean()
    loss.backward()
    return loss.detach()


def validate(model: SwitchSAE, x: torch.Tensor) -> dict[str, float]:
    """Relative error ||sparse - dense|| / ||dense|| of the loss and every gradient.

    Not elementwise: the two GEMMs round differently, which can swap a near-tied k-th and
    (k+1)-th feature in a few rows, so a norm-wise bound is the meaningful check.
    """
    results = {}
    for variant in VARIANTS:
        loss = step(variant, model, x)
        results[variant] = [loss] + [p.grad.clone() for p in model.parameters()]
    names = ["loss"] + [f"grad_{n}" for n, _ in model.named_parameters()]
    errors = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, *results.values())}
    bad = {n: e for n, e in errors.items() if not e < 1e-3}
    if bad:
        raise AssertionError(f"sparse and dense steps disagree (relative errors {bad})")
    return errors


def profiled_peak_bytes(variant: str, model: SwitchSAE, x: torch.Tensor) -> int:
    """Peak torch-allocated CPU bytes during one step, beyond those live before it."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(variant, model, x)

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    # total_allocated is the running net allocation since profiling started.
    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    return max((e.extra_fields.total_allocated for e in events
                if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"), default=0)


def peak_rss_in_subprocess(variant: str, argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", variant],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]  # KiB / 1024 in measure.py


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--n-experts", type=int, default=32)
    p.add_argument("--d-expert", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-active", type=int, default=1)
    p.add_argument("--tile-rows", type=int, default=1024)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_memory.json")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not switch_sae.ops.HAS_EXTENSION:
        raise SystemExit("switch_sae._C is not built: this benchmark measures the compiled ops")
    model, x = build(args)
    if args.child:  # fresh process: nothing but the inputs and parameters is resident
        model.zero_grad(set_to_none=True)
        print(json.dumps(peak_memory(lambda: step(args.child, model, x))))
        return
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "torch": torch.__version__,
        "param_MiB": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
        "input_MiB": x.numel() * x.element_size() / MIB,
        "relative_error_sparse_vs_dense": validate(model, x),
    }
    for variant in VARIANTS:
        result[variant] = {
            "step_time": time_calls(lambda: step(variant, model, x), warmup=1, repeats=args.steps, max_seconds=120),
            "peak_alloc_MiB": profiled_peak_bytes(variant, model, x) / MIB,
            "peak_rss_MiB": peak_rss_in_subprocess(variant, argv),
        }
    dense, sparse = result["dense"], result["sparse"]
    result["speedup"] = dense["step_time"]["median_ms"] / sparse["step_time"]["median_ms"]
    result["alloc_ratio"] = dense["peak_alloc_MiB"] / sparse["peak_alloc_MiB"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
