"""Run one benchmark case and return its records; also the entry point of the fresh
process the runner starts per case (``python -m benchmarks.worker SPEC_JSON``).

A case spec is a flat dict: the run's shapes and timing options plus ``family`` (train,
gemm, ops, optimiser, harvest) and, for training steps, ``impl``, ``variant``, ``n_experts`` and
``d_sae``. Every record gets the shapes, a ``status`` (ok, skipped, validation_failed,
failed), the load average around the case (to judge contention), library versions and
the machine description.

What it leaves out: choosing the cases and writing results (``runner.py``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from .machine import machine, versions
from .measure import ValidationError, peak_memory, time_calls

RESULT_MARK = "@@switch_sae benchmark records@@"


def timing_options(spec: dict) -> dict:
    return {"warmup": spec["warmup"], "repeats": spec["repeats"], "max_seconds": spec["max_seconds"]}


def train_records(spec: dict, timing: dict) -> list[dict]:
    from .cases_train import PEER_MODULES, build_train_case

    if spec["impl"] in PEER_MODULES:
        __import__(PEER_MODULES[spec["impl"]])  # ImportError here means "not installed": skipped
    g = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(spec["batch"], spec["d_in"], generator=g)  # [batch, d_in]
    case = build_train_case(spec, x)
    stats = time_calls(case.step, **timing)
    timed = case.phases[-stats["repeats"]:]
    phases = {name: sorted(p[i] for p in timed)[len(timed) // 2] * 1e3
              for i, name in enumerate(("forward", "backward", "optimizer"))}
    return [{**stats, **peak_memory(case.step), "phases_ms": phases, "param_mb": case.param_mb,
             "tokens_per_s": spec["batch"] / stats["median_ms"] * 1e3, "validation": case.validation}]


def family_records(spec: dict) -> list[dict]:
    timing = timing_options(spec)
    torch.manual_seed(spec["seed"])
    if spec["family"] == "train":
        return train_records(spec, timing)
    if spec["family"] == "gemm":
        from .cases_ops import gemm_records
        return gemm_records(spec, timing)
    if spec["family"] == "ops":
        from .cases_ops import op_records
        return op_records(spec, timing)
    if spec["family"] == "optimiser":
        from .cases_optim import optimiser_records
        return optimiser_records(spec, timing)
    if spec["family"] == "harvest":
        from .cases_harvest import harvest_records
        return harvest_records(spec, timing)
    raise ValueError(f"unknown case family {spec['family']!r}")


def run_case(spec: dict) -> list[dict]:
    """Records of one case; a failure becomes a record with its status and error message."""
    base = {key: spec.get(key) for key in ("name", "variant", "n_experts", "d_in", "d_sae", "batch", "k")}
    if spec.get("impl") in ("switch_sae", "dense_mask_reference"):
        base["d_expert"] = spec["d_sae"] // spec["n_experts"]
    load_before = os.getloadavg()[0]
    default_threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        records = [{**base, "status": "ok", **r} for r in family_records(spec)]
    except ValidationError as err:
        records = [{**base, "status": "validation_failed", "error": str(err)}]
    except ImportError as err:
        records = [{**base, "status": "skipped", "error": f"not importable here: {err}"}]
    except Exception as err:  # noqa: BLE001 - one broken case must not lose the others' results
        records = [{**base, "status": "failed", "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(limit=6)}]
    finally:
        machine_info = machine()  # records the threads the case ran with
        torch.set_num_threads(default_threads)
    context = {"load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
               "versions": versions(), "machine": machine_info}
    return [{**r, **context} for r in records]


def main() -> None:
    records = run_case(json.loads(sys.argv[1]))
    print(RESULT_MARK + json.dumps(records), flush=True)


if __name__ == "__main__":
    main()
