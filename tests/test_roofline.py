"""The roofline's formulas (benchmarks/roofline.py): FLOPs against torch's FLOP counter on
the ops' own computations, bytes against tiny cases counted by hand, and the annotation of
benchmark records."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from switch_sae import reference
from switch_sae.models.switch import SwitchSAE, SwitchSAEConfig
from benchmarks import roofline
from benchmarks.report import gpu_roofline_table, roofline_table


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def routed_case(batch=37, d_in=12, n_experts=3, d_expert=10, k=4, n_active=2, seed=0):
    """Inputs of encode_topk with random (unbalanced) routing, and the matching Shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g)
    W_enc = torch.randn(n_experts, d_expert, d_in, generator=g)
    experts = torch.stack([torch.randperm(n_experts, generator=g)[:n_active] for _ in range(batch)])
    order, offsets = reference.dispatch(experts.reshape(-1), n_experts)
    shape = roofline.Shape(batch=batch, d_in=d_in, d_sae=n_experts * d_expert, n_experts=n_experts, k=k, n_active=n_active)
    return shape, (x, W_enc, None, torch.zeros(d_in), order, offsets, n_active, k, 64)


@pytest.mark.parametrize("n_active", [1, 2])
def test_encode_flops_are_the_routed_gemm_counted_on_the_reference(n_active):
    shape, args = routed_case(n_active=n_active)
    counted = counted_flops(lambda: reference.encode_topk(*args))  # one matmul per expert, however unbalanced
    assert counted == roofline.encode_topk(shape).flops == 2 * 37 * n_active * 10 * 12
    x, W_enc = args[0], args[1]
    assert counted_flops(lambda: torch.mm(x, W_enc[0].T)) == roofline.routed_gemm(shape).flops


def gathered_decode(values, indices, W):
    """``reference.decode`` written as a batched matrix product, so the counter sees its MACs."""
    return torch.bmm(values.unsqueeze(1), W[indices]).squeeze(1)  # [rows, 1, k] x [rows, k, d_in]


def test_decode_and_its_backward_flops_counted_through_autograd():
    shape, args = routed_case(n_active=1)
    values, indices = reference.encode_topk(*args)
    W_dec = torch.randn(shape.d_sae, shape.d_in)
    assert torch.allclose(gathered_decode(values, indices, W_dec), reference.decode(values, indices, W_dec), atol=1e-5)
    v, W = values.clone().requires_grad_(), W_dec.clone().requires_grad_()
    out = {}
    forward = counted_flops(lambda: out.setdefault("y", gathered_decode(v, indices, W)))
    backward = counted_flops(lambda: out["y"].backward(torch.randn_like(out["y"])))
    assert forward == roofline.decode(shape).flops
    assert backward == roofline.decode_backward(shape).flops  # grad of values and of the gathered rows


def test_encode_backward_flops_counted_through_autograd():
    shape, args = routed_case(n_active=2)
    x, W_enc = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    values, indices = reference.encode_topk(*args)
    tokens = torch.arange(shape.rows) // shape.n_active

    def selected_pre():  # the k chosen pre-activations of each pair, recomputed from its rows
        rows = W_enc.reshape(shape.d_sae, shape.d_in)[indices]  # [rows, k, d_in]
        return torch.bmm(rows, x[tokens].unsqueeze(-1)).squeeze(-1)

    pre = selected_pre()
    assert torch.allclose(pre.clamp_min(0), values, atol=1e-5)
    assert counted_flops(lambda: pre.backward(torch.randn_like(pre))) == roofline.encode_backward(shape).flops


# A case small enough to count every byte by hand: batch 3, d_in 5, 2 experts of 4 features
# (d_sae 8), k 2, float32 values (4 B), int64 indices (8 B), tiles of one pair.
TINY = roofline.Shape(batch=3, d_in=5, d_sae=8, n_experts=2, k=2, tile_rows=1)


def test_bytes_of_a_tiny_case_counted_by_hand():
    # experts [3] in, order [3] and offsets [3] out
    assert roofline.dispatch(TINY) == roofline.Cost(0, 24 + 24 + 24)
    # x 3*5*4 = 60; 1.5 pairs per expert in tiles of 1: 2 tiles each, 4 reads of a 4x5 slice
    # = 320; b_dec 20; order 24 + offsets 24; values 3*2*4 = 24 and indices 3*2*8 = 48
    assert roofline.encode_topk(TINY) == roofline.Cost(2 * 3 * 4 * 5, 60 + 320 + 20 + 24 + 24 + 24 + 48)
    # values 24 + indices 48 + 6 gathered rows of 5 floats (120) + out 3*5*4 (60)
    assert roofline.decode(TINY) == roofline.Cost(2 * 6 * 5, 24 + 48 + 120 + 60)
    # grad_out 60 + values 24 + indices 48 + gathered rows 120 + grad_values 24 + grad_W_dec 8*5*4 (160)
    assert roofline.decode_backward(TINY) == roofline.Cost(4 * 6 * 5, 60 + 24 + 48 + 120 + 24 + 160)
    # grad_values 24 + values 24 + indices 48 + x 60 + gathered rows 120 + grad_x 60
    # + grad_W_enc 160 + grad_b_enc 8*4 (32)
    assert roofline.encode_backward(TINY) == roofline.Cost(4 * 6 * 5, 24 + 24 + 48 + 60 + 120 + 60 + 160 + 32)
    # [3, 5] x [5, 4] -> [3, 4]: (15 + 20 + 12) floats
    assert roofline.routed_gemm(TINY) == roofline.Cost(2 * 3 * 5 * 4, 4 * 47)


def test_adam_moves_seven_streams_of_every_parameter():
    model = SwitchSAE(SwitchSAEConfig(d_in=5, n_experts=2, d_expert=4, k=2))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == TINY.n_params == 100  # W_enc, W_dec 40 each, W_router 10, b_router 5, b_dec 5
    assert roofline.adam(TINY).bytes == 7 * 4 * 100  # read p, grad, m, v; write p, m, v
    # the whole update: read every gradient and the 8x5 decoder (norm pass), then Adam's pass
    assert roofline.optimiser_update(TINY).bytes == 4 * (100 + 40 + 7 * 100)
    assert roofline.decoder_parallel_grad_removal(TINY).bytes == 4 * 3 * 40  # read G, W; write G
    dense = roofline.Shape(batch=3, d_in=5, d_sae=8, n_experts=1, k=2, router=False)
    assert dense.n_params == 2 * 8 * 5 + 8 + 5  # a TopK SAE: W_enc, W_dec, b_enc, b_dec


def test_time_is_the_slower_of_compute_and_memory():
    cost = roofline.Cost(flops=2 * 10**9, bytes=10**9)
    assert cost.time_ms(gflops=100, gb_per_s=10) == pytest.approx(100.0)  # 1 GB at 10 GB/s
    assert cost.time_ms(gflops=10, gb_per_s=100) == pytest.approx(200.0)  # 2 GFLOP at 10 GFLOP/s


def test_step_roofline_is_the_sum_of_its_parts():
    shape = roofline.Shape(batch=4096, d_in=512, d_sae=65536, n_experts=64, k=32)
    total, parts = roofline.step_time_ms(shape, gflops=100, gb_per_s=40)
    assert set(parts) == {"router", "dispatch", "encode_topk", "decode", "loss", "decode_backward",
                          "encode_backward", "adam"}
    assert total == pytest.approx(sum(parts.values()))
    whole = roofline.step_cost(shape)
    assert total > whole.time_ms(100, 40)  # the encoder's GEMM cannot hide Adam's traffic
    assert parts["encode_topk"] == pytest.approx(2 * 4096 * 1024 * 512 / 100 / 1e9 * 1e3)  # compute-bound


def rates_records(gflops=100.0, gb_per_s=40.0):
    """Rate records whose fastest calls reach these rates (their medians are twice as slow)."""
    return [{"name": "gemm_peak", "status": "ok", "gflops": gflops / 2, "flops": gflops * 1e6, "min_ms": 1.0,
             "median_ms": 2.0},
            {"name": "memory_bandwidth", "status": "ok", "gb_per_s": gb_per_s / 2, "bytes": gb_per_s * 1e6, "min_ms": 1.0,
             "median_ms": 2.0}]


def op_record(name, n_experts, median_ms, **shape):
    return {"name": name, "variant": "switch_sae", "status": "ok", "n_experts": n_experts, "median_ms": median_ms,
            "batch": 4096, "d_in": 512, "d_sae": 65536, "k": 32, **shape}


def test_annotate_adds_roofline_fields_to_modelled_records():
    shape = roofline.Shape(batch=4096, d_in=512, d_sae=65536, n_experts=16, k=32)
    decode_bytes = roofline.decode(shape).bytes
    decode_roof = decode_bytes / 40 / 1e6
    records = rates_records() + [
        op_record("op_decode", 16, 2 * decode_roof),
        {**op_record("switch_sae", 16, 500.0), "variant": None},
        {**op_record("saelens_topk", None, 900.0), "variant": "width_matched"},
        {"name": "harvest", "status": "ok", "median_ms": 3.0},
    ]
    roofline.annotate(records)
    decode = records[2]
    assert decode["roofline_ms"] == pytest.approx(decode_roof)
    assert decode["roofline_ratio"] == pytest.approx(2.0)
    assert decode["bandwidth_fraction"] == pytest.approx(0.5)
    step = records[3]
    assert step["roofline_ms"] == pytest.approx(roofline.step_time_ms(shape, 100, 40)[0])
    assert step["roofline_parts_ms"]["decode"] == pytest.approx(decode_roof)
    dense = roofline.Shape(batch=4096, d_in=512, d_sae=65536, n_experts=1, k=32, router=False)
    assert records[4]["roofline_ms"] == pytest.approx(roofline.step_time_ms(dense, 100, 40)[0])
    assert "router" not in records[4]["roofline_parts_ms"]
    assert "roofline_ms" not in records[5]  # a model's forward pass is not modelled
    table = roofline_table(records)
    assert "| 16 | decode | " in table and "| 2.00 | 0.50 | memory |" in table
    assert "| 16 | encode_topk | " in gpu_roofline_table(records)


def test_annotate_needs_the_runs_rates():
    records = [op_record("op_decode", 16, 10.0)]
    roofline.annotate(records)
    assert "roofline_ms" not in records[0]
    assert "gemm_peak" in roofline_table(records)
