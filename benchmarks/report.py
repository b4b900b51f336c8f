"""Human-readable views of benchmark records: the per-record table and the ratio table
that the speed targets are judged on.

Targets: (1) at n_experts 16 and 64 the step is >= 0.5 * n_experts times faster than the
dense-and-mask reference, and faster than sae-lens's width-matched TopK by a similar
factor; (2) the step takes <= 1.5x its roofline, every sparse op moves its bytes at >= 50%
of the measured copy bandwidth and encode_topk takes <= 1.3x its routed GEMM
(``roofline.py`` defines the roofline); (3) step memory does not grow with batch * d_sae
(compare peak_mb with the dense-and-mask reference's).

What it leaves out: plots (``plot.py``), the FLOP and byte formulas (``roofline.py``).
"""

from __future__ import annotations

from switch_sae.utils.tables import fmt

from . import roofline


def find(records: list[dict], name: str, n_experts: int | None = None, variant: str | None = None) -> dict | None:
    """The first ``ok`` record with this name and variant (and expert count when given)."""
    for r in records:
        if (r["name"] == name and r.get("status") == "ok" and r.get("variant") == variant
                and (n_experts is None or r.get("n_experts") == n_experts)):
            return r
    return None


def _ms(record: dict | None) -> float | None:
    return None if record is None else record["median_ms"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def step_peak_mb(records: list[dict], name: str, n_experts: int, batch: int) -> float | None:
    """Peak MB of one step of ``name`` at this batch: from the timed case or the memory sweep,
    whichever measured it (the sweep always does: it runs under glibc's malloc, measure.py)."""
    peaks = [r["peak_mb"] for r in records
             if r.get("status") == "ok" and r["name"] == name and r.get("n_experts") == n_experts
             and r.get("batch") == batch and r.get("variant") in (None, "memory_sweep") and r.get("peak_mb") is not None]
    return peaks[-1] if peaks else None


def ratios(records: list[dict]) -> list[dict]:
    """One row per expert count: our step time against every alternative."""
    rows = []
    experts = sorted({r["n_experts"] for r in records if r["name"] == "switch_sae" and r.get("n_experts")})
    for n in experts:
        ours = find(records, "switch_sae", n)
        dense = find(records, "dense_mask_reference", n)
        gemm = find(records, "routed_gemm_limit", n)
        row = {
            "n_experts": n,
            "switch_sae_ms": _ms(ours),
            "dense_mask_ms": _ms(dense),
            "speedup_vs_dense_mask": _ratio(_ms(dense), _ms(ours)),
            "target_speedup": 0.5 * n,
            "routed_gemm_ms": _ms(gemm),
            "step_over_gemm": _ratio(_ms(ours), _ms(gemm)),
            "roofline_ms": ours and ours.get("roofline_ms"),
            "step_over_roofline": ours and ours.get("roofline_ratio"),
            "switch_sae_peak_mb": ours and step_peak_mb(records, "switch_sae", n, ours["batch"]),
            "dense_mask_peak_mb": dense and step_peak_mb(records, "dense_mask_reference", n, dense["batch"]),
        }
        for peer in ("saelens_topk", "dictlearning_topk"):
            row[f"speedup_vs_{peer}_width"] = _ratio(_ms(find(records, peer, None, "width_matched")), _ms(ours))
            flop = find(records, peer, n, "flop_matched")
            row[f"speedup_vs_{peer}_flop"] = _ratio(_ms(flop), _ms(ours))
        rows.append(row)
    return rows


def records_table(records: list[dict]) -> str:
    """Markdown table: one line per record."""
    lines = ["| name | variant | n_experts | d_sae | median ms [q25, q75] | roofline ms (x) | peak MB | extra | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") == "ok":
            timing = f"{r['median_ms']:.4g} [{r['q25_ms']:.4g}, {r['q75_ms']:.4g}]"
            extra = (f"{r['gflops']:.1f} GFLOP/s" if "gflops" in r
                     else f"{r['gb_per_s']:.1f} GB/s" if "gb_per_s" in r
                     else f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else "")
        else:
            timing, extra = "-", r.get("error", "")[:80]
        roof = f"{r['roofline_ms']:.4g} ({r['roofline_ratio']:.2f}x)" if "roofline_ms" in r else ""
        lines.append(f"| {r['name']} | {r.get('variant') or ''} | {fmt(r.get('n_experts'), '.3g')} | {fmt(r.get('d_sae'), '.3g')} "
                     f"| {timing} | {roof} | {fmt(r.get('peak_mb'), '.1f')} | {extra} | {r.get('status')} |")
    return "\n".join(lines)


def ratio_table(records: list[dict]) -> str:
    """Markdown table of the ratios the targets are judged on."""
    lines = ["| n_experts | ours ms | dense-mask ms | speed-up (target) | vs sae-lens width | vs sae-lens FLOP "
             "| vs dict-learning width | vs dict-learning FLOP | step / routed GEMM | step / roofline (target <= 1.5) "
             "| peak MB ours / dense-mask |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ratios(records):
        lines.append(
            f"| {row['n_experts']} | {fmt(row['switch_sae_ms'], '.4g')} | {fmt(row['dense_mask_ms'], '.4g')} "
            f"| {fmt(row['speedup_vs_dense_mask'], '.2f')} (>= {row['target_speedup']:g}) "
            f"| {fmt(row['speedup_vs_saelens_topk_width'], '.2f')} | {fmt(row['speedup_vs_saelens_topk_flop'], '.2f')} "
            f"| {fmt(row['speedup_vs_dictlearning_topk_width'], '.2f')} "
            f"| {fmt(row['speedup_vs_dictlearning_topk_flop'], '.2f')} | {fmt(row['step_over_gemm'], '.2f')} "
            f"| {fmt(row['step_over_roofline'], '.2f')} "
            f"| {fmt(row['switch_sae_peak_mb'], '.0f')} / {fmt(row['dense_mask_peak_mb'], '.0f')} |")
    return "\n".join(lines)


def phase_table(records: list[dict]) -> str:
    """Where a training step's time goes: forward / backward / optimiser per implementation."""
    lines = ["| name | variant | n_experts | forward ms | backward ms | optimizer ms |", "|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") == "ok" and "phases_ms" in r:
            p = r["phases_ms"]
            lines.append(f"| {r['name']} | {r.get('variant') or ''} | {fmt(r.get('n_experts'), '.3g')} | {p['forward']:.4g} "
                         f"| {p['backward']:.4g} | {p['optimizer']:.4g} |")
    return "\n".join(lines)


def memory_table(records: list[dict]) -> str:
    """Peak MB of one step at the largest n_experts for each batch: ours against dense-and-mask."""
    steps = [r for r in records if r.get("status") == "ok" and r["name"] in ("switch_sae", "dense_mask_reference")]
    if not steps:
        return ""
    n = max(r["n_experts"] for r in steps)
    batches = sorted({r["batch"] for r in steps if r["n_experts"] == n and r.get("variant") in (None, "memory_sweep")})
    lines = [f"| batch (n_experts = {n}) | switch_sae peak MB | dense-and-mask peak MB | switch_sae param MB |",
             "|---|---|---|---|"]
    for b in batches:
        ours = next((r for r in steps if r["name"] == "switch_sae" and r["n_experts"] == n and r["batch"] == b), None)
        lines.append(f"| {b} | {fmt(step_peak_mb(records, 'switch_sae', n, b), '.0f')} "
                     f"| {fmt(step_peak_mb(records, 'dense_mask_reference', n, b), '.0f')} "
                     f"| {fmt(ours and ours.get('param_mb'), '.0f')} |")
    return "\n".join(lines)


def machine_line(records: list[dict]) -> str:
    """One sentence naming the machine and versions the records came from."""
    if not records:
        return ""
    m, v = records[0]["machine"], records[0]["versions"]
    return (f"{m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} torch threads, "
            f"{m['memory_gb']} GB, {m['cpu_capability']}, malloc {m.get('malloc', 'glibc')}; "
            f"torch {v['torch']}, switch_sae {v['switch_sae']} "
            f"(compiled ops: {v['switch_sae_extension']}, CPU encoder GEMM: "
            f"{v.get('switch_sae_cpu_encoder_gemm', 'aten')})")


def _bound(cost: roofline.Cost, gflops: float, gb_per_s: float) -> str:
    return "memory" if cost.bytes / gb_per_s >= cost.flops / gflops else "compute"


def _inplace_note(records: list[dict], gb_per_s: float) -> str:
    inplace = next((r for r in records if r["name"] == "memory_bandwidth_inplace" and r.get("status") == "ok"), None)
    if inplace is None:
        return ""
    rate = roofline.best_rate(inplace)
    return (f" An in-place update (`a += b`) moves its bytes at {rate:.1f} GB/s "
            f"({rate / gb_per_s:.2f}x the copy): a copy's destination is also read (write-allocate), "
            "so in-place passes such as Adam's can run under their copy-based roofline.")


def roofline_table(records: list[dict]) -> str:
    """Per expert count: our step, each of our ops and the routed GEMM against their rooflines."""
    rates = roofline.machine_rates(records)
    if rates is None:
        return "(needs the run's gemm_peak and memory_bandwidth records: include the gemm cases)"
    gflops, gb_per_s = rates
    lines = [f"Rates of this run (fastest call): {gflops:.1f} GFLOP/s (`gemm_peak`), {gb_per_s:.1f} GB/s (`memory_bandwidth`). "
             "Fraction of bandwidth: bytes moved / measured time / copy bandwidth (target >= 0.5 for the sparse ops)."
             + _inplace_note(records, gb_per_s), "",
             "| n_experts | part | measured ms | roofline ms | measured / roofline | fraction of bandwidth | bound "
             "| where the time goes (ms): costliest calls, or a step's phases |",
             "|---|---|---|---|---|---|---|---|"]
    experts = sorted({r["n_experts"] for r in records if r.get("roofline_ms") and r["name"].startswith(("op_", "switch_sae"))})
    for n in experts:
        rows = [("step", find(records, "switch_sae", n))]
        rows += [(name, find(records, f"op_{name}", n, "switch_sae")) for name in roofline.OPS]
        rows.append(("routed GEMM", find(records, "routed_gemm_limit", n)))
        for label, r in rows:
            if r is None or "roofline_ms" not in r:
                continue
            bound = _bound(roofline.Cost(r["flops"], r["bytes"]), gflops, gb_per_s) if label != "step" else "sum of parts"
            fraction = f"{r['bandwidth_fraction']:.2f}" if bound == "memory" else ""
            split = r.get("profile_ms") or r.get("phases_ms") or {}  # a step's split is its phases
            profile = "; ".join(f"{name} {ms:.3g}" for name, ms in sorted(split.items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"| {n} | {label} | {r['median_ms']:.4g} | {r['roofline_ms']:.4g} | {r['roofline_ratio']:.2f} "
                         f"| {fraction} | {bound} | {profile} |")
        ratio = _ratio(_ms(find(records, "op_encode_topk", n, "switch_sae")), _ms(find(records, "routed_gemm_limit", n)))
        lines.append(f"| {n} | encode_topk / routed GEMM (target <= 1.3) | {fmt(ratio, '.2f')} | | | | | |")
    return "\n".join(lines)


def gpu_roofline_table(records: list[dict], gpu: dict = roofline.H100_SXM) -> str:
    """The step's parts on paper on ``gpu`` at this run's shapes, with bfloat16 values."""
    shaped = [r for r in records if r["name"] == "switch_sae" and r.get("status") == "ok" and r.get("variant") is None]
    shaped = shaped or [r for r in records if r["name"].startswith("op_") and r.get("status") == "ok"]
    if not shaped:
        return ""
    gflops, gb_per_s = gpu["gflops"], gpu["gb_per_s"]
    lines = [f"{gpu['name']}: {gflops / 1e3:.0f} TFLOP/s, {gb_per_s / 1e3:.2f} TB/s; bfloat16 values, int64 indices.", "",
             "| n_experts | part | GFLOP | MB moved | roofline us | bound |", "|---|---|---|---|---|---|"]
    for n in sorted({r["n_experts"] for r in shaped}):
        r = next(r for r in shaped if r["n_experts"] == n)
        shape = roofline.Shape(batch=r["batch"], d_in=r["d_in"], d_sae=r["d_sae"], n_experts=n, k=r["k"], value_bytes=2)
        parts = roofline.step_parts(shape)
        for label, cost in [*parts.items(), ("step (sum of parts)", None)]:
            if cost is None:
                total = roofline.step_cost(shape)
                us = roofline.step_time_ms(shape, gflops, gb_per_s)[0] * 1e3
                lines.append(f"| {n} | {label} | {total.flops / 1e9:.3g} | {total.bytes / 1e6:.4g} | {us:.4g} | |")
            else:
                lines.append(f"| {n} | {label} | {cost.flops / 1e9:.3g} | {cost.bytes / 1e6:.4g} "
                             f"| {cost.time_ms(gflops, gb_per_s) * 1e3:.4g} | {_bound(cost, gflops, gb_per_s)} |")
    return "\n".join(lines)


def optimiser_table(records: list[dict]) -> str:
    """Each pass of the update after backward, and the whole update op by op and blocked."""
    rows = [r for r in records if r["name"].startswith("optimiser_") and r.get("status") == "ok"]
    if not rows:
        return ""
    lines = ["| pass | variant | measured ms | roofline ms | measured / roofline | fraction of bandwidth |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name'][len('optimiser_'):]} | {r['variant']} | {r['median_ms']:.4g} "
                     f"| {fmt(r.get('roofline_ms'), '.4g')} | {fmt(r.get('roofline_ratio'), '.2f')} "
                     f"| {fmt(r.get('bandwidth_fraction'), '.2f')} |")
    return "\n".join(lines)
