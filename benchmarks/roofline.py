"""The roofline of every timed op and of a training step: analytic FLOPs and minimal bytes.

A roofline time is ``max(flops / GEMM rate, bytes / copy bandwidth)``: the time the work
would take if it ran at the machine's measured dense-GEMM rate (``gemm_peak``) or moved its
bytes at the measured copy bandwidth (``memory_bandwidth``), whichever is slower; each
rate is that of its fastest timed call (``best_rate``). A step
is a sequence of ops that cannot hide one another's time (the GEMM of the encoder cannot
overlap Adam's traffic), so a step's roofline is the **sum** of its parts' rooflines.

Symbols: ``B`` tokens, ``A = n_active``, ``R = B * A`` (token, expert) pairs, ``E``
experts, ``m = d_expert``, ``M = d_sae = E * m``, ``d = d_in``, ``k``, ``s`` bytes of a
value (4 in float32, 2 in bfloat16), ``i`` bytes of an index (8, int64), ``P`` parameters.

FLOPs count multiply-adds as 2 and only the matrix products (what the GEMM rate is a rate
of); elementwise work, TopK comparisons and sorts are each at most ``1 / d`` of the matrix
products of their op, except in the optimiser, whose elementwise FLOPs are counted
(``ADAM_FLOPS_PER_PARAM``) and never decide its time.

Bytes count what must cross the memory bus at least once, under one rule fixed by the
machine's caches: a tensor of the batch's size (``x``, ``grad_out``: ``B * d * s`` = 8 MiB
at the benchmark shapes) fits in the last-level cache (32 MiB here) and is counted once per
op however often the op reads it; a weight matrix (``M * d * s`` = 128 MiB) does not, and
its rows, which each token gathers from ``k`` scattered features, are counted once per
(pair, slot) that reads them; a dense weight-shaped output (a gradient) is written once.
A kernel that groups tokens by feature could read each used weight row once and beat
these byte counts (its ratio would drop below 1): the model is the gather algorithm the
ops specify, which the benchmark's bandwidth fractions are judged against.

Per op (``reference.py`` fixes what each computes):

* ``dispatch``: reads ``R`` expert ids, writes ``order [R]`` and ``offsets [E + 1]``:
  ``bytes = i (2 R + E + 1)``, no matrix FLOPs.
* ``encode_topk``: each pair's ``x`` row times its expert's ``W_enc [m, d]``:
  ``flops = 2 R m d``. Bytes: ``x`` rows (``R d s``), each expert's slice once per tile of
  at most ``tile_rows`` pairs (``T m d s`` with ``T = E * ceil(R / (E tile_rows))`` tiles
  under balanced routing), ``b_dec`` (``d s``), ``order`` and ``offsets``
  (``i (R + E + 1)``), and the outputs ``values``/``indices`` (``R k (s + i)``). The
  pre-activations of a tile stay in cache, as a fused TopK keeps them.
* ``decode``: ``out[r] = sum_j values[r, j] W_dec[indices[r, j]]``: ``flops = 2 R k d``;
  ``bytes = R k (s + i) + R k d s`` (gathered rows) ``+ R d s`` (out).
* ``decode_backward``: ``grad_values = <grad_out[r], W_dec[f]>`` and
  ``grad_W_dec[f] += values grad_out[r]``: ``flops = 4 R k d``;
  ``bytes = R d s`` (grad_out) ``+ R k (s + i) + R k d s`` (gathered rows)
  ``+ R k s`` (grad_values) ``+ M d s`` (grad_W_dec, dense, written once).
* ``encode_backward``: ``grad_x[t] = sum_j grad_pre W_enc[f]`` and
  ``grad_W_enc[f] += grad_pre (x[t] - b_dec)``: ``flops = 4 R k d``;
  ``bytes = R k (2 s + i)`` (grad_values, values, indices) ``+ B d s`` (x)
  ``+ R k d s`` (gathered rows) ``+ B d s`` (grad_x) ``+ M d s + M s`` (grad_W_enc,
  grad_b_enc, dense, written once).
* ``routed_gemm``: the benchmark's ``torch.mm`` of ``[B, d] x [d, m]`` (one expert's
  weights against the whole batch: the encoder's matrix FLOPs at ``A = 1``):
  ``flops = 2 B d m``; ``bytes = s (B d + d m + B m)``.
* ``adam`` (torch's fused Adam, one pass): reads param, grad and both moments, writes
  param and both moments: ``bytes = 7 P s``; ``flops = ADAM_FLOPS_PER_PARAM * P``.
* The trainer's other passes over the parameters, each at its minimum of one pass:
  ``decoder_parallel_grad_removal`` (``G -= <G, w> w`` per decoder row: reads G and W,
  writes G, ``3 M d s``; ``flops = 4 M d``), ``decoder_renormalise`` (reads and writes W,
  ``2 M d s``; ``flops = 3 M d``), ``grad_clip_norm`` (reads every gradient, ``P s``;
  ``flops = 2 P``) and ``grad_clip_scale`` (reads and writes every gradient, ``2 P s``;
  ``flops = P``; skipped when the norm is within the limit).
* ``optimiser_update``, the trainer's whole update after backward at its minimum: the
  global norm needs every projected gradient before any update, so one pass reads every
  gradient and the decoder's weights (``P s + M d s``), then one pass does the projection
  again in cache, Adam and the renormalisation (``7 P s``): ``bytes = (8 P + M d) s``.

A training step of the benchmark (``switch_sae``: forward, loss, backward, Adam; no
clipping or renormalisation) is the sum of ``router`` (the router's ``[B, d] x [d, E]``
product and its weight gradient: ``flops = 4 B d E``, ``bytes = 2 s (B d + E d + B E)``),
``dispatch``, ``encode_topk``, ``decode``, ``loss`` (``x_hat = decode + b_dec``, MSE and its
gradient, fused: reads x and the decoder's output, writes grad: ``3 B d s``),
``decode_backward``, ``encode_backward`` and ``adam``; the gate and the load-balancing
terms touch ``O(B (k + E))`` elements and are left out, and the ``b_dec`` gradient
(column sums of grad_x and grad_out) folds into the passes producing them. A dense TopK SAE
(the peers' steps) is the same step with one expert and no router.

What it leaves out: measuring the rates (``cases_ops.py``: ``gemm_peak``,
``memory_bandwidth``) and writing tables (``report.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from switch_sae.evals.flops import ADAM_FLOPS_PER_PARAM, SAEShape, parameter_count
from switch_sae.models.switch import SwitchSAEConfig

INDEX_BYTES = 8  # int64 ids and offsets
TILE_ROWS = SwitchSAEConfig.__dataclass_fields__["tile_rows"].default

H100_SXM = {"name": "H100 SXM (paper: dense bf16 tensor cores, HBM3)", "gflops": 989e3, "gb_per_s": 3350.0}
"""NVIDIA's published H100 SXM5 figures: 989.4 TFLOP/s dense bf16 (1979 with 2:4 sparsity)
and 3.35 TB/s HBM3. A GPU step is judged against these with 2-byte values (a bfloat16
model: parameters, gradients, Adam moments and activations)."""


@dataclass(frozen=True)
class Shape:
    """The sizes every op's cost depends on."""

    batch: int
    """Tokens per step."""
    d_in: int
    """Activation width."""
    d_sae: int
    """Total features."""
    n_experts: int
    """Experts; 1 for a dense TopK SAE."""
    k: int
    """Active features per token."""
    n_active: int = 1
    """Experts per token."""
    tile_rows: int = TILE_ROWS
    """Pairs one expert encodes at once (its W_enc slice is read once per tile)."""
    value_bytes: int = 4
    """Bytes of one value: 4 in float32, 2 in bfloat16."""
    router: bool = True
    """Whether the step has a router (a Switch SAE) or not (a dense TopK SAE)."""

    @property
    def d_expert(self) -> int:
        return self.d_sae // self.n_experts

    @property
    def rows(self) -> int:
        return self.batch * self.n_active

    @property
    def n_params(self) -> int:
        if self.router:
            return parameter_count(SAEShape("switch", self.d_in, self.d_sae, self.k, self.n_experts, self.n_active,
                                            use_encoder_bias=False))
        return parameter_count(SAEShape("topk", self.d_in, self.d_sae, self.k))


@dataclass(frozen=True)
class Cost:
    """Matrix FLOPs and minimal bytes of some work."""

    flops: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def time_ms(self, gflops: float, gb_per_s: float) -> float:
        """``max(flops / rate, bytes / bandwidth)`` in ms, rates in GFLOP/s and GB/s (1e9)."""
        return max(self.flops / gflops, self.bytes / gb_per_s) / 1e6


def dispatch(s: Shape) -> Cost:
    return Cost(0, INDEX_BYTES * (2 * s.rows + s.n_experts + 1))


def encode_tiles(s: Shape) -> int:
    """Tiles of ``encode_topk`` under balanced routing: every expert holds ``R / E`` pairs."""
    return s.n_experts * math.ceil(s.rows / (s.n_experts * s.tile_rows))


def encode_topk(s: Shape) -> Cost:
    v, i, d = s.value_bytes, INDEX_BYTES, s.d_in
    reads = v * (s.rows * d + encode_tiles(s) * s.d_expert * d + d) + i * (s.rows + s.n_experts + 1)
    return Cost(2 * s.rows * s.d_expert * d, reads + s.rows * s.k * (v + i))


def decode(s: Shape) -> Cost:
    v, pairs = s.value_bytes, s.rows * s.k
    return Cost(2 * pairs * s.d_in, pairs * (v + INDEX_BYTES) + v * pairs * s.d_in + v * s.rows * s.d_in)


def decode_backward(s: Shape) -> Cost:
    v, pairs, d = s.value_bytes, s.rows * s.k, s.d_in
    moved = v * s.rows * d + pairs * (v + INDEX_BYTES) + v * pairs * d + v * pairs + v * s.d_sae * d
    return Cost(4 * pairs * d, moved)


def encode_backward(s: Shape) -> Cost:
    v, pairs, d = s.value_bytes, s.rows * s.k, s.d_in
    moved = (pairs * (2 * v + INDEX_BYTES) + v * s.batch * d + v * pairs * d + v * s.batch * d
             + v * s.d_sae * d + v * s.d_sae)
    return Cost(4 * pairs * d, moved)


def routed_gemm(s: Shape) -> Cost:
    B, d, m = s.batch, s.d_in, s.d_expert
    return Cost(2 * B * d * m, s.value_bytes * (B * d + d * m + B * m))


def adam(s: Shape) -> Cost:
    return Cost(ADAM_FLOPS_PER_PARAM * s.n_params, 7 * s.n_params * s.value_bytes)


def router(s: Shape) -> Cost:
    B, d, E = s.batch, s.d_in, s.n_experts
    return Cost(4 * B * d * E, 2 * s.value_bytes * (B * d + E * d + B * E))


def loss(s: Shape) -> Cost:
    return Cost(0, 3 * s.batch * s.d_in * s.value_bytes)


def decoder_parallel_grad_removal(s: Shape) -> Cost:
    return Cost(4 * s.d_sae * s.d_in, 3 * s.d_sae * s.d_in * s.value_bytes)


def decoder_renormalise(s: Shape) -> Cost:
    return Cost(3 * s.d_sae * s.d_in, 2 * s.d_sae * s.d_in * s.value_bytes)


def grad_clip_norm(s: Shape) -> Cost:
    return Cost(2 * s.n_params, s.n_params * s.value_bytes)


def grad_clip_scale(s: Shape) -> Cost:
    return Cost(s.n_params, 2 * s.n_params * s.value_bytes)


def optimiser_update(s: Shape) -> Cost:
    work = adam(s) + grad_clip_norm(s) + decoder_parallel_grad_removal(s) + decoder_renormalise(s)
    return Cost(work.flops, (8 * s.n_params + s.d_sae * s.d_in) * s.value_bytes)


OPS = {"dispatch": dispatch, "encode_topk": encode_topk, "decode": decode,
       "decode_backward": decode_backward, "encode_backward": encode_backward}
"""The custom ops, by the name of their ``op_<name>`` records."""

OPTIMISER_PASSES = {"adam": adam, "decoder_parallel_grad_removal": decoder_parallel_grad_removal,
                    "decoder_renormalise": decoder_renormalise, "grad_clip_norm": grad_clip_norm,
                    "grad_clip_scale": grad_clip_scale, "update": optimiser_update}
"""The trainer's passes over the parameters, each at its one-pass minimum, and the whole
update, by the name of their ``optimiser_<name>`` records."""


def step_parts(s: Shape) -> dict[str, Cost]:
    """The parts of one benchmark training step (see the module docstring)."""
    parts = {"router": router(s), "dispatch": dispatch(s)} if s.router else {}
    return {**parts, "encode_topk": encode_topk(s), "decode": decode(s), "loss": loss(s),
            "decode_backward": decode_backward(s), "encode_backward": encode_backward(s), "adam": adam(s)}


def step_time_ms(s: Shape, gflops: float, gb_per_s: float) -> tuple[float, dict[str, float]]:
    """A step's roofline (the sum of its parts') and each part's, in ms."""
    parts = {name: cost.time_ms(gflops, gb_per_s) for name, cost in step_parts(s).items()}
    return sum(parts.values()), parts


def step_cost(s: Shape) -> Cost:
    return sum(step_parts(s).values(), Cost(0, 0))


# ------------------------------------------------------------------ records of a benchmark run

STEPS = ("switch_sae", "dense_mask_reference", "saelens_topk", "dictlearning_topk")
"""Training-step records; the peers' dense TopK steps are one-expert steps without a router."""


def shape_of_record(record: dict) -> Shape:
    dense = record["name"] in ("saelens_topk", "dictlearning_topk")
    return Shape(batch=record["batch"], d_in=record["d_in"], d_sae=record["d_sae"],
                 n_experts=1 if dense else record["n_experts"], k=record["k"], router=not dense)


def record_cost(record: dict) -> Cost | None:
    """The work an ``ok`` record timed; None when it is not modelled (``harvest``) or
    measures a rate (``gemm_peak``, ``memory_bandwidth``, ``memory_bandwidth_inplace``)."""
    name = record["name"]
    if name == "routed_gemm_limit":
        return routed_gemm(shape_of_record(record))
    if name.startswith("op_") and name[3:] in OPS:
        return OPS[name[3:]](shape_of_record(record))
    if name.startswith("optimiser_") and name[10:] in OPTIMISER_PASSES:
        return OPTIMISER_PASSES[name[10:]](shape_of_record(record))
    if name in STEPS:
        return step_cost(shape_of_record(record))
    return None


def best_rate(record: dict) -> float:
    """GFLOP/s or GB/s of a rate record's fastest call: a machine's peak is what it reached,
    and on a shared machine a disturbed call can only lower it (the median can halve)."""
    work = record["flops"] if "gflops" in record else record["bytes"]
    return work / record["min_ms"] / 1e6


def machine_rates(records: list[dict]) -> tuple[float, float] | None:
    """(GFLOP/s of ``gemm_peak``, GB/s of ``memory_bandwidth``) of a run, each its fastest
    call's (``best_rate``), if the run measured both."""
    gemm = next((r for r in records if r["name"] == "gemm_peak" and r.get("status") == "ok"), None)
    copy = next((r for r in records if r["name"] == "memory_bandwidth" and r.get("status") == "ok"), None)
    return (best_rate(gemm), best_rate(copy)) if gemm and copy else None


def annotate(records: list[dict]) -> list[dict]:
    """Add ``flops``, ``bytes``, ``roofline_ms``, ``roofline_ratio`` (measured / roofline) and
    ``bandwidth_fraction`` (achieved GB/s over the measured copy bandwidth) to every timed
    record the model covers; steps also get ``roofline_parts_ms``. Needs the run's
    ``gemm_peak`` and ``memory_bandwidth`` records; without them nothing is added."""
    rates = machine_rates(records)
    if rates is None:
        return records
    gflops, gb_per_s = rates
    for r in records:
        cost = record_cost(r) if r.get("status") == "ok" else None
        if cost is None:
            continue
        if r["name"] in STEPS:
            roof, parts = step_time_ms(shape_of_record(r), gflops, gb_per_s)
            r["roofline_parts_ms"] = parts
        else:
            roof = cost.time_ms(gflops, gb_per_s)
        r["flops"] = cost.flops
        r["bytes"] = cost.bytes
        r["roofline_ms"] = roof
        r["roofline_ratio"] = r["median_ms"] / roof
        r["bandwidth_fraction"] = cost.bytes / r["median_ms"] / 1e6 / gb_per_s
    return records
