"""Training a Switch SAE across 1, 2 and 4 processes (gloo, CPU): step time, bytes exchanged
per step against the analytic count, and parameter memory per process.

    python benchmarks/parallel_scaling.py                  # worlds 1 2 4, both modes
    python benchmarks/parallel_scaling.py --worlds 1 2 --steps 10 --quick

Each world size is one ``torch.multiprocessing`` spawn of ``Trainer(..., parallel=mode)``
processes, each training on its slice of the same global batches (one thread each). In
expert mode every all-to-all adds the bytes it sends to other processes to a counter
(``switch_sae.parallel.alltoall.Traffic``), and a forward hook records each step's routing,
from which the analytic count follows (``P`` remote (token, expert) pairs, ``D`` remote
(token, decoder-owner) rows, summed over processes; ``k`` values are float32, ids int64):

    forward   P (4 d_in + 12 k)      token rows out, codes back
            + D (12 k + 4 d_in)      codes to the decoder rows' owners, partial x_hat back
    backward  P 4 k + D (4 k + 4 d_in)   value gradients both ways, x_hat-part gradients
              (the token rows carry no gradient: the inputs are data)

AuxK is off here so that every exchange is the forward pass's own. Data mode moves no
tokens; its traffic is the gradient all-reduce of the whole SAE (not counted here: about
``2 (W-1)/W`` x the parameter bytes per process with a ring). Results go to
``benchmarks/results/parallel_scaling.json`` (git-ignored) and are printed as a table.
On a 2-core machine, 4 processes oversubscribe the cores: their times measure the
exchange's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def shapes(quick: bool) -> dict:
    if quick:
        return {"d_in": 64, "n_experts": 8, "d_expert": 64, "k": 8, "batch": 256}
    return {"d_in": 256, "n_experts": 16, "d_expert": 512, "k": 32, "batch": 2048}


def batches(shape: dict, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(32, shape["d_in"], generator=g)
    return [centers[torch.randint(32, (shape["batch"],), generator=g)] + torch.randn(shape["batch"], shape["d_in"], generator=g)
            for _ in range(steps)]


def remote_rows(out, rank: int, world: int, held_experts: int, held_latents: int) -> tuple[int, int]:
    """(P, D) of this process: pairs whose expert, and (token, owner) rows whose decoder, live elsewhere."""
    P = int((out.experts // held_experts != rank).sum())
    owners = out.code.indices // held_latents  # [batch, k]
    per_owner = torch.zeros(owners.shape[0], world, dtype=torch.bool).scatter_(1, owners, True)
    per_owner[:, rank] = False
    return P, int(per_owner.sum())


def worker(rank: int, world: int, port: int, mode: str, shape: dict, steps: int, out_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from switch_sae import SwitchSAE, SwitchSAEConfig, TrainConfig, Trainer

    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=shape["d_in"], n_experts=shape["n_experts"], d_expert=shape["d_expert"],
                                    k=shape["k"], auxk_coefficient=0.0))
    trainer = Trainer(sae, TrainConfig(total_steps=steps, parallel=mode, progress=False))
    routing = []
    sae.register_forward_hook(lambda module, args, out: routing.append(out))
    exchange = getattr(trainer.parallel, "exchange", None)
    times, measured, analytic = [], [], []
    for batch in batches(shape, steps):
        mine = torch.tensor_split(batch, world)[rank]
        if exchange is not None:
            exchange.traffic.reset()
        start = time.perf_counter()
        trainer.step(mine)
        times.append(time.perf_counter() - start)
        if exchange is not None:
            P, D = remote_rows(routing[-1], rank, world, exchange.held, exchange.held_latents)
            d, k = shape["d_in"], shape["k"]
            analytic.append([P * (4 * d + 12 * k) + D * (12 * k + 4 * d), P * 4 * k + D * (4 * k + 4 * d)])
            measured.append([exchange.traffic.forward_bytes, exchange.traffic.backward_bytes])
        routing.clear()
    params = {name: p.numel() * p.element_size() for name, p in sae.named_parameters()}
    record = {"rank": rank, "times": times, "measured": measured, "analytic": analytic, "param_bytes": params}
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(world: int, mode: str, ranks: list[dict], warmup: int) -> dict:
    step_ms = 1e3 * statistics.median(max(r["times"][i] for r in ranks) for i in range(warmup, len(ranks[0]["times"])))
    expert = sum(b for n, b in ranks[0]["param_bytes"].items() if n in ("W_enc", "W_dec", "b_enc"))
    record = {"world": world, "mode": mode, "step_ms": round(step_ms, 1),
              "param_mb_per_rank": round(sum(ranks[0]["param_bytes"].values()) / 2**20, 2),
              "expert_param_mb_per_rank": round(expert / 2**20, 2)}
    if ranks[0]["measured"]:
        for key in ("measured", "analytic"):
            for i, part in enumerate(("forward", "backward")):  # summed over processes, mean over steps
                per_step = [sum(r[key][step][i] for r in ranks) for step in range(len(ranks[0][key]))]
                record[f"{key}_{part}_mb"] = round(statistics.mean(per_step) / 2**20, 3)
        # Per process the directions differ (P out, P in); summed over processes they must match.
        steps = range(len(ranks[0]["measured"]))
        record["measured_equals_analytic"] = all(
            [sum(r["measured"][s][i] for r in ranks) for i in (0, 1)] == [sum(r["analytic"][s][i] for r in ranks) for i in (0, 1)]
            for s in steps)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["expert", "data"], choices=["expert", "data"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    args = parser.parse_args()
    shape = shapes(args.quick)
    RESULTS.mkdir(exist_ok=True)
    records = []
    for mode in args.modes:
        for world in args.worlds:
            out_file = RESULTS / f".parallel_{mode}_{world}.json"
            mp.start_processes(worker, args=(world, free_port(), mode, shape, args.steps, str(out_file)), nprocs=world,
                               start_method="spawn")
            records.append(summarise(world, mode, json.loads(out_file.read_text()), args.warmup))
            out_file.unlink()
            print(json.dumps(records[-1]))
    (RESULTS / "parallel_scaling.json").write_text(json.dumps({"shape": shape, "records": records}, indent=1))
    columns = list(records[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in records:
        print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()
