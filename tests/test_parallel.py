"""Training across processes (switch_sae.parallel) equals one-process training.

Worker processes are spawned with torch.multiprocessing and join a gloo process group the
way torchrun's would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each runs several cases
in turn and writes its parameters, dead-latent counters and metrics to disk. The test then
trains each case in this process on the same global batches and compares: parameters,
counters and the logged losses (balance loss and AuxK included) within 1e-5 relative.
One spawn per world size keeps the cost of starting processes down.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from switch_sae import SAE, TrainConfig, Trainer, architectures
from switch_sae.models.sharded import EXPERT_PARAMETERS, is_sharded
from switch_sae.training.checkpoint import CheckpointError, staging_folder

STEPS = 20
D_IN = 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def case(name, arch, mode, sizes, **cfg):
    """A training case: ``sizes`` are each rank's rows of every global batch."""
    return {"name": name, "arch": arch, "mode": mode, "sizes": sizes, "cfg": cfg}


SWITCH = {"n_experts": 8, "d_expert": 6, "k": 3}
CASES = {
    2: [
        # 8 experts for 13 tokens: some expert is idle in most steps; 7 + 6 rows is uneven.
        case("expert-uneven", "switch", "expert", [7, 6], **SWITCH),
        case("expert-two-active-empty-rank", "switch", "expert", [15, 0], **SWITCH, n_active=2,
             use_encoder_bias=True, feature_scaling=True, gate="renormalized"),
        case("expert-resume", "switch", "expert", [6, 6], **SWITCH),
        case("data-switch", "switch", "data", [7, 6], **SWITCH, n_active=2),
        case("data-topk", "topk", "data", [5, 8], d_sae=24, k=3),
        case("data-batchtopk", "batchtopk", "data", [9, 4], d_sae=24, k=3),
        case("data-relu", "relu", "data", [6, 6], d_sae=24),
        case("data-gated", "gated", "data", [6, 7], d_sae=24),
        case("data-jumprelu", "jumprelu", "data", [0, 12], d_sae=24),
    ],
    4: [
        case("expert-uneven-4", "switch", "expert", [4, 3, 3, 2], **SWITCH),
        case("expert-two-active-4", "switch", "expert", [5, 0, 4, 3], **SWITCH, n_active=2),
        case("data-switch-4", "switch", "data", [3, 3, 3, 2], **SWITCH),
    ],
}


def global_batches(spec) -> list[torch.Tensor]:
    """Clustered activations, the same in every process."""
    g = torch.Generator().manual_seed(len(spec["name"]))
    centers = 3 * torch.randn(5, D_IN, generator=g)
    n = sum(spec["sizes"])
    return [centers[torch.randint(5, (n,), generator=g)] + torch.randn(n, D_IN, generator=g) + 1.0 for _ in range(STEPS)]


def new_model(spec):
    torch.manual_seed(0)
    cls = architectures()[spec["arch"]]
    return cls(cls.config_class(d_in=D_IN, **spec["cfg"]))


def train_config(spec, mode, run_dir, **changes) -> TrainConfig:
    # dead_after_tokens of two batches: latents die within the run, so AuxK trains.
    return TrainConfig(total_steps=STEPS, lr=3e-3, dead_after_tokens=2 * sum(spec["sizes"]), parallel=mode,
                       parallel_timeout_s=60, run_dir=str(run_dir), progress=False, **changes)


def my_rows(batch, sizes, rank):
    start = sum(sizes[:rank])
    return batch[start : start + sizes[rank]]


def run_case(spec, rank, out: Path) -> None:
    batches = [my_rows(b, spec["sizes"], rank) for b in global_batches(spec)]
    run = out / spec["name"]
    if spec["name"].startswith("expert-resume"):  # stop halfway (checkpoint), then resume
        Trainer(new_model(spec), train_config(spec, spec["mode"], run)).fit(batches[: STEPS // 2])
        if rank == 0:  # a kill while the next checkpoint was being written leaves it half staged
            debris = staging_folder(run / "checkpoints", STEPS // 2 + 1) / "rank_00000"
            debris.mkdir(parents=True)
            (debris / "model.safetensors").write_bytes(b"\0" * 10)
        trainer = Trainer(new_model(spec), train_config(spec, spec["mode"], run, resume=True))
        assert trainer.step_count == STEPS // 2
    else:
        trainer = Trainer(new_model(spec), train_config(spec, spec["mode"], run))
    trainer.fit(batches)
    state = {name: t.detach().contiguous() for name, t in trainer.model.state_dict().items()}
    state["dead.tokens_since_fired"] = trainer.dead.tokens_since_fired
    save_file(state, str(out / f"{spec['name']}.rank{rank}.safetensors"))
    exchange = getattr(trainer.parallel, "exchange", None)
    if exchange is not None:
        (out / f"{spec['name']}.rank{rank}.traffic.json").write_text(json.dumps(vars(exchange.traffic)))


def worker(rank: int, world: int, port: int, out: str, names: list[str], fail_at: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = Path(out)
    try:
        if fail_at is not None:
            fail_worker(rank, fail_at)
        for spec in CASES[world]:
            if spec["name"] in names:
                run_case(spec, rank, out)
    except BaseException as err:
        error = {"error": f"{type(err).__name__}: {err}", "at": time.time(), "traceback": traceback.format_exc()}
        (out / f"error.rank{rank}.json").write_text(json.dumps(error))
        raise


def fail_worker(rank: int, fail_at: int) -> None:
    """Rank 1 raises at step ``fail_at``; rank 0 must then stop with an error by itself."""
    spec = CASES[2][0]

    def batches():
        for step, batch in enumerate(global_batches(spec)):
            if rank == 1 and step == fail_at:
                raise RuntimeError("rank 1 fails on purpose")
            yield my_rows(batch, spec["sizes"], rank)

    cfg = TrainConfig(total_steps=STEPS, parallel="expert", parallel_timeout_s=20, progress=False)
    Trainer(new_model(spec), cfg).fit(batches())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out: Path, names: list[str], fail_at: int | None = None, join: bool = True):
    return mp.start_processes(worker, args=(world, free_port(), str(out), names, fail_at), nprocs=world,
                              join=join, start_method="spawn")


def assert_relative(name, got, want, tol=1e-5):
    got, want = got.double(), want.double()
    scale = want.norm().clamp_min(1e-12)
    assert (got - want).norm() / scale <= tol, f"{name}: relative difference {((got - want).norm() / scale).item():.3g}"


def single_process(spec, run_dir):
    trainer = Trainer(new_model(spec), train_config(spec, "none", run_dir))
    trainer.fit(global_batches(spec))
    return trainer


def check_case(spec, out: Path, world: int):
    reference = single_process(spec, out / "single" / spec["name"])
    shards = [load_file(str(out / f"{spec['name']}.rank{r}.safetensors")) for r in range(world)]
    for name, want in reference.model.state_dict().items():
        if spec["mode"] == "expert" and name in EXPERT_PARAMETERS:
            got = torch.cat([s[name] for s in shards])
            assert shards[0][name].shape[0] == want.shape[0] // world  # each rank holds 1/W of the experts
        else:
            got = shards[0][name]
            for other in shards[1:]:
                torch.testing.assert_close(other[name], got, rtol=0, atol=0)  # replicas stay identical
        assert_relative(f"{spec['name']}: {name}", got, want)
    for shard in shards:
        assert torch.equal(shard["dead.tokens_since_fired"], reference.dead.tokens_since_fired)
    # The logged metrics (rank 0's) are the batch's: loss, balance loss, AuxK, dead counts.
    mine = [json.loads(line) for line in (out / spec["name"] / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (out / "single" / spec["name"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mine] == list(range(1, STEPS + 1))
    for a, b in zip(mine, theirs):
        assert a["n_dead"] == b["n_dead"] and a["tokens"] == b["tokens"]
        for key in ("loss", "mse", "fvu", "l0", "lb", "p_max", "router_entropy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (spec["name"], a["step"], key)
        assert a["parts"].keys() == b["parts"].keys()
        for key in b["parts"]:
            assert a["parts"][key] == pytest.approx(b["parts"][key], rel=1e-5, abs=1e-9), (spec["name"], a["step"], key)
    # The saved SAE loads whole in one process, whatever wrote it.
    assert is_sharded(out / spec["name"] / "sae") == (spec["mode"] == "expert")
    loaded = SAE.load(out / spec["name"] / "sae")
    for name, want in SAE.load(out / "single" / spec["name"] / "sae").state_dict().items():
        assert_relative(f"{spec['name']} saved: {name}", loaded.state_dict()[name], want)
    return reference, theirs


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_training_equals_one_process(world, tmp_path):
    spawn(world, tmp_path, [spec["name"] for spec in CASES[world]])
    for spec in CASES[world]:
        reference, metrics = check_case(spec, tmp_path, world)
        if spec["name"] == "expert-uneven":  # the cases the test means to cover do occur
            assert any(0.0 in m["expert_load"] for m in metrics), "no step had an idle expert"
        if spec["mode"] == "expert" or spec["arch"] in ("topk", "batchtopk"):
            assert any("auxk" in m["parts"] for m in metrics), f"{spec['name']}: AuxK never trained"
        if spec["mode"] == "expert":
            traffic = json.loads((tmp_path / f"{spec['name']}.rank0.traffic.json").read_text())
            assert traffic["forward_bytes"] > 0 and traffic["backward_bytes"] > 0
    if world == 2:
        check_resuming_elsewhere(tmp_path)


def check_resuming_elsewhere(out: Path) -> None:
    """A sharded checkpoint has a folder per rank and one manifest; another layout resuming
    it (or a data-parallel one) is told what wrote it."""
    run = out / "expert-resume"
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["manifest.json", "rank_00000", "rank_00001"]
    spec = next(s for s in CASES[2] if s["name"] == "expert-resume")
    with pytest.raises(CheckpointError, match="written by 2 expert-parallel processes"):
        Trainer(new_model(spec), train_config(spec, "none", run, resume=True))
    spec = next(s for s in CASES[2] if s["name"] == "data-switch")
    with pytest.raises(CheckpointError, match="parallel"):
        Trainer(new_model(spec), train_config(spec, "none", out / spec["name"], resume=True))


def test_a_failing_rank_stops_the_others_with_an_error(tmp_path):
    context = spawn(2, tmp_path, [], fail_at=3, join=False)
    for process in context.processes:
        process.join(timeout=120)
    assert all(p.exitcode not in (None, 0) for p in context.processes), [p.exitcode for p in context.processes]
    failed, stopped = (json.loads((tmp_path / f"error.rank{r}.json").read_text()) for r in (1, 0))
    assert "fails on purpose" in failed["error"]
    # Rank 0 raised by itself (nothing here kills it), within the 20 s collective timeout.
    assert "Error" in stopped["error"]
    assert stopped["at"] - failed["at"] < 20


def test_each_process_takes_its_share_of_every_batch_and_the_same_number_of_steps():
    from switch_sae.activations.pipeline import DataConfig, process_share

    data = DataConfig(batch_size=13, train_tokens=130, epochs=2)
    shares = [process_share(data, rank, 3) for rank in range(3)]
    assert [s.batch_size for s in shares] == [5, 4, 4]
    assert {s.steps() for s in shares} == {data.steps()} == {20}
    assert sum(s.train_tokens for s in shares) == 130
    with pytest.raises(ValueError, match="smaller than the 16 processes"):
        process_share(data, 0, 16)


def test_stored_rows_give_each_process_its_own_block():
    from switch_sae.activations.stored import StoredActivations

    data = torch.arange(30.0).view(15, 2)
    stored = StoredActivations(Path("x"), 2, 15, "", "", lambda: iter(data.split(4)))
    assert torch.equal(torch.cat(list(stored.rows(3, 10))), data[3:10])
    assert len(stored.rows(3, 10)) == 7 and list(stored.rows(5, 5)) == []
    with pytest.raises(ValueError, match="not within the 15 stored rows"):
        stored.rows(10, 16)


def test_torchrun_trains_an_expert_parallel_switch_sae_from_the_command_line(tmp_path):
    """Two processes under torchrun, each on its block of stored activations; the saved SAE
    loads whole in this process and each process held half of the experts."""
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "acts.npy", (torch.randn(256, D_IN, generator=g) + 2).numpy())
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "switch_sae", "train", "switch", "--parallel", "expert", "--parallel-timeout-s", "60",
               "--activations", str(tmp_path), "--n-experts", "4", "--d-expert", "8", "--k", "2",
               "--batch-size", "32", "--no-progress", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"saved {out / 'sae'}") == 1  # rank 0 reports, alone
    sae = SAE.load(out / "sae")
    assert sae.W_enc.shape[0] == 4
    for rank in range(2):
        shard = load_file(str(out / "sae" / f"rank_0000{rank}" / "model.safetensors"))
        assert shard["W_enc"].shape[0] == shard["W_dec"].shape[0] == 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in metrics] == [32 * step for step in range(1, 9)]  # 256 rows in global batches of 32
