"""The training recipe as a user meets it: units-free (the data's scale does not change the
SAE), a trained model that takes raw activations, AuxK that revives dead latents within a
short run, a healthy router on clustered data, and architectures that own their loss terms
(a toy one, defined here, trains without any trainer change)."""

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from switch_sae import SAE, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig, TrainConfig, Trainer
from switch_sae.activations import SyntheticActivations, SyntheticConfig
from switch_sae.models import losses
from switch_sae.models import base
from switch_sae.models.base import ForwardOutput, register_architecture
from switch_sae.models.baseline import DictionaryConfig, DictionarySAE

CLUSTERED = SyntheticActivations(SyntheticConfig(d_in=32, n_features=128, n_clusters=8, features_per_token=3))


pytestmark = pytest.mark.usefixtures("one_thread")


def stream(n: int, size: int = 256, seed: int = 1, scale: float = 1.0) -> list[Tensor]:
    return [b * scale for b in CLUSTERED.batches(size, n, seed=seed)]


def switch(**kw) -> SwitchSAE:
    torch.manual_seed(0)
    return SwitchSAE(SwitchSAEConfig(**{"d_in": 32, "n_experts": 4, "d_expert": 32, "k": 3, **kw}))


@pytest.mark.parametrize("make", [lambda: switch(dtype="float64"), lambda: TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=3, dtype="float64"))])
def test_scaling_the_data_trains_the_same_sae(make):
    """Multiplying the activations by 0.01, 1 or 100 gives the same loss curve (in training
    units) and the same dictionary; the folded biases scale with the data."""
    runs = {}
    for scale in (0.01, 1.0, 100.0):
        torch.manual_seed(0)
        model = make()
        trainer = Trainer(model, TrainConfig(total_steps=40, progress=False, dead_after_tokens=2000))
        curve = [trainer.step(b) for b in stream(40, scale=scale)]
        trainer.to_raw_units()
        runs[scale] = (model, curve)
    reference, ref_curve = runs[1.0]
    for scale in (0.01, 100.0):
        model, curve = runs[scale]
        torch.testing.assert_close([m.loss for m in curve], [m.loss for m in ref_curve], rtol=1e-6, atol=0)
        assert [sorted(m.parts) for m in curve] == [sorted(m.parts) for m in ref_curve]
        torch.testing.assert_close(model.W_dec, reference.W_dec, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.b_dec / scale, reference.b_dec, rtol=1e-5, atol=1e-7)
    assert "auxk" in ref_curve[-1].parts  # the comparison covered the AuxK term too


def test_after_fit_the_model_takes_raw_activations_and_training_can_continue(tmp_path):
    data = stream(30, scale=50.0)  # far from E||x||^2 = d_in
    model = switch()
    trainer = Trainer(model, TrainConfig(total_steps=30, progress=False, run_dir=str(tmp_path)))
    trainer.fit(data[:20])  # the stream runs out before total_steps
    assert trainer.input_scale < 0.1
    model.eval()
    x = stream(1, seed=7, scale=50.0)[0]
    with torch.no_grad():
        x_hat = model(x).x_hat
        assert losses.fvu(x, x_hat).item() < 0.5  # raw in, raw out
        torch.testing.assert_close(SAE.load(tmp_path / "sae")(x).x_hat, x_hat)
    trainer.fit(data)  # continues in training units from batch 20
    assert trainer.step_count == 30
    straight = switch()
    Trainer(straight, TrainConfig(total_steps=30, progress=False)).fit(data)
    for (name, got), want in zip(model.named_parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_auxk_switches_on_in_a_short_run_and_revives_dead_latents():
    """With the default window (a tenth of the run), AuxK acts within a short run and leaves
    fewer dead latents, and a better reconstruction, than the same run without it."""
    data = SyntheticActivations(SyntheticConfig(d_in=64, n_features=256, n_clusters=8, features_per_token=3))
    batches = list(data.batches(512, 150, seed=3))  # 76,800 tokens
    final = {}
    for coefficient in (SwitchSAEConfig(d_in=64, n_experts=8, d_expert=64, k=4).auxk_coefficient, 0.0):
        torch.manual_seed(0)
        model = SwitchSAE(SwitchSAEConfig(d_in=64, n_experts=8, d_expert=64, k=4, auxk_coefficient=coefficient))
        trainer = Trainer(model, TrainConfig(total_steps=150, progress=False))
        history = [trainer.step(b) for b in batches]
        assert trainer.dead.dead_after_tokens == 7_680
        final[coefficient] = history[-1]
        assert ("auxk" in history[-1].parts) == (coefficient > 0 and history[-2].n_dead > 0)
    (with_auxk, without) = final.values()
    print(f"dead {with_auxk.n_dead} vs {without.n_dead}; fvu {with_auxk.fvu:.4f} vs {without.fvu:.4f}")
    assert with_auxk.n_dead < without.n_dead and with_auxk.fvu < without.fvu


def test_dead_window_scales_with_the_run_and_caps_at_ten_million():
    assert TrainConfig(total_steps=100).resolved_dead_after_tokens(1000) == 10_000
    assert TrainConfig(total_steps=100_000).resolved_dead_after_tokens(8192) == 10_000_000
    assert TrainConfig(total_steps=100, dead_after_tokens=7).resolved_dead_after_tokens(1000) == 7


def test_default_recipe_keeps_the_router_balanced_and_decisive():
    """Clustered data, defaults only: balance statistic <= 1.1 and mean p_max >= 0.5, logged
    every step alongside the router entropy."""
    model = switch(n_experts=8, d_expert=16)
    trainer = Trainer(model, TrainConfig(total_steps=300, progress=False))
    history = [trainer.step(b) for b in stream(300, seed=5)]
    for m in history:
        assert m.lb is not None and m.p_max is not None and m.router_entropy is not None
    tail = history[-30:]
    balance = sum(m.lb for m in tail) / len(tail)
    p_max = sum(m.p_max for m in tail) / len(tail)
    print(f"balance {balance:.3f}, p_max {p_max:.3f}, fvu {tail[-1].fvu:.4f}")
    assert balance <= 1.1 and p_max >= 0.5


# -- an architecture the trainer has never heard of ---------------------------------------


@dataclass(kw_only=True)
class TiedConfig(DictionaryConfig):
    """A ReLU SAE whose encoder is its decoder, with a penalty on the pre-bias' norm."""

    bias_coefficient: float = 0.1


class TiedSAE(DictionarySAE):
    """Tied ReLU SAE (a test architecture)."""

    architecture = "test-tied"
    config_class = TiedConfig

    def __init__(self, cfg: TiedConfig) -> None:
        super().__init__(cfg)
        del self.W_enc
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))
        self.setup_hooks()

    def forward(self, x: Tensor) -> ForwardOutput:
        x, lead = self.check_input(x)
        acts = torch.relu((x - self.b_dec) @ self.W_dec.T + self.b_enc)  # [batch, d_sae]
        return ForwardOutput(x_hat=acts @ self.W_dec + self.b_dec, code=None, acts=acts)

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        terms = super().training_terms(x, out, dead)
        terms["bias"] = self.cfg.bias_coefficient * losses.weight_unit(x) * self.b_dec.pow(2).sum() / x.shape[-1]
        return terms


def test_a_new_architecture_trains_through_its_own_training_terms(tmp_path, monkeypatch):
    # registered for this test only, so that other tests see the library's own architectures
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_architecture(TiedSAE)
    torch.manual_seed(0)
    model = TiedSAE(TiedConfig(d_in=32, d_sae=64))
    trainer = Trainer(model, TrainConfig(total_steps=60, lr=3e-3, progress=False, run_dir=str(tmp_path)))
    first = trainer.step(stream(1)[0])
    last = trainer.fit(stream(60))
    assert set(last.parts) == {"bias"} and last.mse < 0.7 * first.mse
    loaded = SAE.load(tmp_path / "sae")
    assert isinstance(loaded, TiedSAE)
