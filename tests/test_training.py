"""Training: losses, AuxK against a dense computation, the recipe end to end on synthetic
data, checkpoints that resume exactly, mixed precision and input normalisation."""

import json
import os
import signal

import pytest
import torch

from switch_sae import (
    SAE,
    BatchTopKSAE,
    BatchTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    ReLUSAE,
    ReLUSAEConfig,
    StepMetrics,
    SwitchSAE,
    SwitchSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TrainConfig,
    Trainer,
    ops,
)
from switch_sae.activations import SyntheticActivations, SyntheticConfig, mean_max_cosine
from switch_sae.models import losses
from switch_sae.models.auxk import dead_latent_code
from switch_sae.training import CheckpointError, SignSGD, geometric_median

D_IN = 16
DATA = SyntheticActivations(SyntheticConfig(d_in=D_IN, n_features=64, n_clusters=4, features_per_token=3))


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch: str, **kw) -> SAE:
    torch.manual_seed(0)
    if arch == "switch":
        return SwitchSAE(SwitchSAEConfig(**{"d_in": D_IN, "n_experts": 4, "d_expert": 32, "k": 3, **kw}))
    if arch == "topk":
        return TopKSAE(TopKSAEConfig(**{"d_in": D_IN, "d_sae": 128, "k": 3, **kw}))
    if arch == "batchtopk":
        return BatchTopKSAE(BatchTopKSAEConfig(d_in=D_IN, d_sae=128, k=3, **kw))
    if arch == "relu":
        return ReLUSAE(ReLUSAEConfig(d_in=D_IN, d_sae=128, **kw))
    if arch == "gated":
        return GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=128, **kw))
    return JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=128, threshold_init=0.05, bandwidth=0.05, **kw))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"total_steps": 40, "lr": 3e-3, "progress": False, "dead_after_tokens": 2000, **kw})


def batches(n: int, size: int = 128, seed: int = 1) -> list[torch.Tensor]:
    return list(DATA.batches(size, n, seed=seed))


# -- losses ------------------------------------------------------------------------------


def test_mse_fvu_and_l1():
    x, x_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    assert losses.mse(x, x_hat).item() == pytest.approx((4 + 1) / 2)  # summed over d_in
    assert losses.total_variance(x).item() == pytest.approx(2.0)  # (1 + 1 + 1 + 1) / 2
    assert losses.fvu(x, x_hat).item() == pytest.approx(1.25)
    acts, W_dec = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert losses.weighted_l1(acts, W_dec).item() == pytest.approx(1 * 5 + 2 * 2)


def test_load_balancing_is_one_when_balanced_and_n_experts_when_collapsed():
    probs = torch.full((8, 4), 0.25, requires_grad=True)
    experts = torch.arange(8).remainder(4).unsqueeze(-1)
    assert losses.load_balancing(probs, experts).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 1.0
    assert losses.load_balancing(collapsed, torch.full((8, 1), 2)).item() == pytest.approx(4.0)
    losses.load_balancing(probs, experts).backward()  # gradient through P only
    torch.testing.assert_close(probs.grad, torch.full((8, 4), 4 * 0.25 / 8))
    load = losses.expert_load(torch.tensor([[0, 1], [0, 3]]), 4)  # n_active = 2 counts
    torch.testing.assert_close(load, torch.tensor([0.5, 0.25, 0.0, 0.25]))


def test_geometric_median():
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geometric_median(line, max_iter=1000, tol=1e-9).item() == pytest.approx(2.0, abs=1e-3)
    torch.manual_seed(0)
    points = torch.cat([torch.randn(50, 3), torch.full((5, 3), 50.0)])  # outliers drag the mean
    median = geometric_median(points)

    def cost(p):
        return (points - p).norm(dim=-1).sum()

    assert median.norm() < 1.0 < points.mean(0).norm()
    for _ in range(20):  # a local minimum of a convex function is the minimum
        assert cost(median) <= cost(median + 0.05 * torch.randn(3)) + 1e-4
    with pytest.raises(ValueError, match="points"):
        geometric_median(torch.randn(3))


# -- AuxK against a dense, masked computation ----------------------------------------------


def dense_dead_recon(model, x, out, dead, k_aux):
    """The textbook AuxK code: mask a [batch, d_sae] pre-activation matrix."""
    W = model.encoder_weight()  # [n_experts, d_expert, d_in]
    n_experts, d_expert, _ = W.shape
    pre = (x - model.b_dec) @ W.reshape(n_experts * d_expert, -1).T
    if model.b_enc is not None:
        pre = pre + model.b_enc.reshape(-1)
    expert_of = torch.arange(n_experts * d_expert) // d_expert
    gate = torch.ones(x.shape[0], n_experts)
    if out.experts is not None:
        gate = torch.zeros_like(gate).scatter(1, out.experts, out.router_probs.gather(1, out.experts).detach())
    gate_per_latent = gate[:, expert_of]  # [batch, d_sae]; 0 for experts the token did not use
    allowed = dead.unsqueeze(0) & (gate_per_latent > 0)
    gated = torch.where(allowed, torch.relu(pre) * gate_per_latent, torch.zeros_like(pre))
    top = gated.topk(k_aux, dim=-1)
    return torch.einsum("bk,bkd->bd", top.values, model.W_dec_flat[top.indices])


@pytest.mark.parametrize(
    "arch, kw",
    [("switch", {}), ("switch", {"n_active": 2, "use_encoder_bias": True}), ("topk", {}), ("batchtopk", {})],
)
def test_auxk_matches_dense_masked_computation(arch, kw):
    model = make(arch, **kw)
    with torch.no_grad():
        if model.b_enc is not None:
            model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    x = batches(1, size=24)[0]
    out = model(x)
    dead = torch.rand(model.d_sae, generator=torch.Generator().manual_seed(3)) < 0.3
    k_aux = 5
    residual = (x - out.x_hat).detach()
    code = dead_latent_code(model, x, out, dead, k_aux)
    assert dead[code.indices[code.values > 0]].all()  # only dead latents fire
    ours = ops.decode(code.values, code.indices, model.W_dec_flat)
    loss = losses.auxk(residual, ours, int(dead.sum()), k_aux)
    grads = torch.autograd.grad(loss, [model.W_enc, model.W_dec, model.b_dec])
    ref = dense_dead_recon(model, x, out, dead, k_aux)
    torch.testing.assert_close(ours, ref)
    ref_loss = losses.auxk(residual, ref, int(dead.sum()), k_aux)
    torch.testing.assert_close(loss, ref_loss)
    ref_grads = torch.autograd.grad(ref_loss, [model.W_enc, model.W_dec, model.b_dec])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    if arch == "switch":  # the gate is detached: AuxK does not train the router
        assert torch.autograd.grad(loss, model.W_router, allow_unused=True)[0] is None


def test_auxk_scale_and_no_dead():
    e, e_hat = torch.randn(6, 4), torch.zeros(6, 4)
    assert losses.auxk(e, e_hat, 0, 8).item() == 0.0
    assert losses.auxk(e, e_hat, 2, 8).item() == pytest.approx(0.25 * (e.pow(2).sum(-1).mean() / losses.total_variance(e)).item())
    assert losses.auxk(e, e_hat, 100, 8).item() == pytest.approx(losses.auxk(e, e_hat, 8, 8).item())


# -- config and schedule ---------------------------------------------------------------------


def test_lr_schedule_and_default_lr():
    cfg = TrainConfig(total_steps=10, lr=1.0, progress=False)
    assert [cfg.lr_at(s, 1) for s in range(10)] == pytest.approx([1] * 8 + [1.0, 0.5])
    warm = TrainConfig(total_steps=10, lr=1.0, warmup_steps=4, decay_fraction=0.0, progress=False)
    assert [warm.lr_at(s, 1) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert TrainConfig(total_steps=5).peak_lr(2**16) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, lr=-1.0), "lr"),
        (dict(total_steps=10, decay_fraction=1.5), "decay_fraction"),
        (dict(total_steps=10, warmup_steps=9), "warmup_steps"),
        (dict(total_steps=10, adam_betas=(0.9, 1.0)), "adam_betas"),
        (dict(total_steps=10, dead_after_tokens=-1), "dead_after_tokens"),
        (dict(total_steps=10, autocast="float16"), "autocast"),
        (dict(total_steps=10, checkpoint_every=5), "run_dir"),
    ],
)
def test_bad_train_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_trainer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        Trainer(torch.nn.Linear(2, 2), config())
    with pytest.raises(TypeError, match="cfg"):
        Trainer(make("topk"), {"total_steps": 3})
    with pytest.raises(ValueError, match="k_aux"):
        make("switch", k_aux=33)  # more than one expert holds
    with pytest.raises(ValueError, match="k_aux"):
        make("topk", k_aux=0)
    with pytest.raises(ValueError, match="lb_coefficient"):
        make("switch", lb_coefficient=-3.0)
    with pytest.raises(ValueError, match="l1_coefficient"):
        make("relu", l1_coefficient=float("nan"))
    trainer = Trainer(make("topk"), config(total_steps=1))
    with pytest.raises(ValueError, match="d_in"):
        trainer.step(torch.randn(4, D_IN + 1))
    trainer.step(batches(1)[0])
    with pytest.raises(RuntimeError, match="finished"):
        trainer.step(batches(1)[0])


# -- the recipe end to end -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["switch", "topk", "batchtopk", "relu", "gated", "jumprelu"])
def test_each_architecture_trains_and_keeps_unit_decoder_rows(arch):
    model = make(arch)
    trainer = Trainer(model, config(total_steps=60))
    history = [trainer.step(b) for b in batches(60)]
    assert all(isinstance(m, StepMetrics) for m in history)
    first, last = history[:5], history[-10:]
    assert sum(m.loss for m in last) / 10 < sum(m.loss for m in first) / 5
    assert sum(m.mse for m in last) / 10 < 0.6 * sum(m.mse for m in first) / 5
    torch.testing.assert_close(model.W_dec_flat.norm(dim=-1), torch.ones(model.d_sae))
    assert all(m.l0 > 0 for m in history)
    if arch in ("switch", "topk"):
        assert all(m.l0 <= 3 for m in history)


def recovered_fraction(model, data, threshold=0.8):
    """Share of ground-truth features with a dictionary row at cosine > threshold."""
    cos = data.features @ model.W_dec_flat.detach().T
    return (cos.max(dim=1).values > threshold).float().mean().item()


def test_switch_recovers_ground_truth_and_load_balances():
    """Mean max cosine of ground-truth features with the learnt dictionary (report it),
    and the balance statistic with and without its loss."""
    data = SyntheticActivations(SyntheticConfig(d_in=32, n_features=128, n_clusters=8, features_per_token=3))
    stream = list(data.batches(256, 400, seed=2))
    results = {}
    default = SwitchSAEConfig(d_in=32, n_experts=8, d_expert=32, k=3).lb_coefficient
    for alpha in (default, 0.0):
        model = make("switch", d_in=32, n_experts=8, d_expert=32, lb_coefficient=alpha)
        start = mean_max_cosine(model.W_dec_flat, data.features)
        found_at_start = recovered_fraction(model, data)
        trainer = Trainer(model, config(total_steps=400, lr=1e-2, dead_after_tokens=5000))
        history = [trainer.step(b) for b in stream]
        lb = sum(m.lb for m in history[-30:]) / 30
        found = recovered_fraction(model, data)
        results[alpha] = (start, mean_max_cosine(model.W_dec_flat, data.features), lb, found, found_at_start)
        print(f"lb_coefficient={alpha}: mean max cosine {start:.3f} -> {results[alpha][1]:.3f}, lb {lb:.3f}, found {found:.2f}")
    start, recovered, lb_balanced, found, found_at_start = results[default]
    assert recovered > 0.85 and found > 0.75  # most directions found...
    assert recovered > start + 0.1 and found > found_at_start + 0.4  # ...by training, not by chance
    assert lb_balanced < 1.05  # n_experts * sum f_i P_i has minimum 1
    assert results[0.0][2] > lb_balanced + 0.1  # without the loss the router drifts


def test_auxk_term_appears_only_with_dead_latents_and_can_be_switched_off():
    trainer = Trainer(make("topk"), config(total_steps=20, dead_after_tokens=256))
    history = [trainer.step(b) for b in batches(20)]
    assert "auxk" not in history[0].parts  # nobody has been silent long enough yet
    assert history[-1].n_dead > 0 and history[-1].parts["auxk"] > 0
    off = Trainer(make("topk", auxk_coefficient=0.0), config(total_steps=20, dead_after_tokens=256))
    assert all("auxk" not in off.step(b).parts for b in batches(20))


def test_dead_counter_counts_tokens_since_firing():
    model = make("topk")
    trainer = Trainer(model, config(total_steps=3, lr=1e-9))
    with torch.no_grad():  # latent 0 can never fire: its pre-activation is -100 before the ReLU
        model.W_enc[0] = 0.0
        model.b_enc[0] = -100.0
    for b in batches(3, size=50):
        trainer.step(b)
    assert trainer.dead.tokens_since_fired[0].item() == 150
    assert trainer.dead.tokens_since_fired.min().item() == 0


@pytest.mark.parametrize("arch", ["switch", "topk", "gated"])
def test_bfloat16_autocast_trains(arch):
    model = make(arch)
    trainer = Trainer(model, config(total_steps=60, autocast="bfloat16"))
    history = [trainer.step(b) for b in batches(60)]
    assert all(torch.isfinite(torch.tensor(m.loss)) for m in history)
    assert sum(m.mse for m in history[-5:]) < 0.6 * sum(m.mse for m in history[:5])
    assert model.W_dec.dtype == torch.float32  # master weights stay float32


@pytest.mark.parametrize("arch", ["switch", "topk", "batchtopk", "relu", "gated", "jumprelu"])
def test_normalised_training_is_folded_into_saved_weights(arch, tmp_path):
    model = make(arch)
    trainer = Trainer(model, config(total_steps=10, normalize_inputs=True))
    for b in batches(10):
        trainer.step(b * 7.0)  # far from E||x||^2 = d_in
    scale = trainer.input_scale
    assert scale == pytest.approx((D_IN / (batches(1)[0] * 7.0).pow(2).sum(-1).mean().item()) ** 0.5, rel=1e-5)
    trainer.save_model(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    model.eval()
    loaded.eval()
    x = batches(1, seed=9)[0] * 7.0
    torch.testing.assert_close(loaded(x).x_hat, model(x * scale).x_hat / scale, rtol=1e-4, atol=1e-4)


# -- checkpoints ----------------------------------------------------------------------------


def losses_in(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def interrupt_at(stream, position):
    """Yield the stream; deliver a real SIGINT (Ctrl-C) just before batch ``position``."""
    for i, b in enumerate(stream):
        if i == position:
            os.kill(os.getpid(), signal.SIGINT)
        yield b


@pytest.mark.parametrize("arch", ["switch", "batchtopk"])
def test_interrupt_and_resume_equals_uninterrupted(arch, tmp_path):
    stream = batches(16, size=64)
    kw = dict(total_steps=16, dead_after_tokens=128)  # AuxK kicks in
    straight = tmp_path / "straight"
    Trainer(make(arch), config(run_dir=str(straight), **kw)).fit(stream)
    expected = losses_in(straight)
    assert sorted(expected) == list(range(1, 17))

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(make(arch), config(run_dir=str(run), **kw)).fit(interrupt_at(stream, 6))
    # the step in flight finishes, then a checkpoint is written at step 7
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000007"]
    model = make(arch)
    with torch.no_grad():  # a fresh model: everything must come from the checkpoint
        for p in model.parameters():
            p.normal_()
    torch.manual_seed(123)  # and so must the RNG
    Trainer(model, config(run_dir=str(run), resume=True, **kw)).fit(stream)
    assert losses_in(run) == expected  # bit-exact on CPU, steps 1..16


def test_the_default_optimiser_is_the_papers_fused_adam():
    trainer = Trainer(make("topk"), config(adam_betas=(0.8, 0.99), adam_eps=1e-7))
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    group = trainer.optimizer.param_groups[0]
    assert group["fused"] and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7


def test_signsgd_trains_and_resumes_exactly(tmp_path):
    stream = batches(12, size=64)
    kw = dict(total_steps=12, lr=1e-3, optimizer="signsgd", dead_after_tokens=128)
    straight = tmp_path / "straight"
    trainer = Trainer(make("switch"), config(run_dir=str(straight), **kw))
    assert isinstance(trainer.optimizer, SignSGD)
    trainer.fit(stream)
    expected = losses_in(straight)
    assert expected[12] < expected[1]

    run = tmp_path / "run"
    Trainer(make("switch"), config(run_dir=str(run), checkpoint_every=5, **kw)).fit(stream[:7])
    Trainer(make("switch"), config(run_dir=str(run), checkpoint_every=5, resume=True, **kw)).fit(stream)
    assert losses_in(run) == expected
    with pytest.raises(CheckpointError, match="optimizer"):  # an Adam run cannot resume a SignSGD one
        Trainer(make("switch"), config(run_dir=str(run), resume=True, **{**kw, "optimizer": "adam"}))


def test_an_unknown_optimiser_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        config(optimizer="lion")


def test_periodic_checkpoints_are_pruned_and_pickle_free(tmp_path):
    # What crashed saves of an earlier run leave: a half-staged step, and a step set aside
    # while being replaced; both go at the next save.
    for debris in (".step_00000005.tmp", ".step_00000003.old"):
        (tmp_path / "checkpoints" / debris).mkdir(parents=True)
        (tmp_path / "checkpoints" / debris / "model.safetensors").write_bytes(b"half")
    Trainer(make("topk"), config(total_steps=9, run_dir=str(tmp_path), checkpoint_every=2, keep_checkpoints=2)).fit(batches(9))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000008", "step_00000009"]
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "mse", "fvu", "l0", "n_dead", "lr", "tokens_per_s", "grad_norm"):
        assert key in record
    assert SAE.load(tmp_path / "sae").architecture == "topk"


def test_resume_continues_from_a_finished_periodic_checkpoint(tmp_path):
    stream = batches(8)
    straight = tmp_path / "a"
    Trainer(make("switch"), config(total_steps=8, run_dir=str(straight))).fit(stream)
    run = tmp_path / "b"
    Trainer(make("switch"), config(total_steps=8, run_dir=str(run), checkpoint_every=3)).fit(stream[:5])
    Trainer(make("switch"), config(total_steps=8, run_dir=str(run), checkpoint_every=3, resume=True)).fit(stream)
    assert losses_in(run) == losses_in(straight)


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path):
    Trainer(make("topk"), config(total_steps=2, run_dir=str(tmp_path))).fit(batches(2))
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(make("topk", k=4), config(total_steps=2, run_dir=str(tmp_path), resume=True))
    with pytest.raises(CheckpointError, match="TrainConfig"):
        Trainer(make("topk"), config(total_steps=3, run_dir=str(tmp_path), resume=True))
    weights = ckpt / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(make("topk"), config(total_steps=2, run_dir=str(tmp_path), resume=True))
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Trainer(make("topk"), config(total_steps=2, run_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("arch, dtype", [("switch", "float64"), ("topk", "bfloat16"), ("jumprelu", "float64")])
def test_other_parameter_dtypes_train_with_auxk(arch, dtype):
    trainer = Trainer(make(arch, dtype=dtype), config(total_steps=30, dead_after_tokens=256))
    history = [trainer.step(b) for b in batches(30)]
    assert all(torch.isfinite(torch.tensor(m.loss)) for m in history)
    assert sum(m.mse for m in history[-5:]) < sum(m.mse for m in history[:5])
    if arch != "jumprelu":
        assert "auxk" in history[-1].parts  # the live-latent mask bias fits the dtype
