"""Training-step cases: one step (forward, loss, backward, Adam) of each implementation.

* ``switch_sae``: our ``SwitchSAE`` on the routed custom ops.
* ``dense_mask_reference``: the same parameters through ``reference.switch_forward``, which
  encodes every token with every expert and masks, as the paper's reference code does.
* ``saelens_topk`` / ``dictlearning_topk``: a dense TopK SAE training step of sae-lens
  (``TopKTrainingSAE.training_forward_pass``) and of dictionary-learning
  (``AutoEncoderTopK``), at the same total width (``variant="width_matched"``) or at one
  expert's width (``variant="flop_matched"``).

Every step is loss, ``backward``, ``torch.optim.Adam.step`` (fused unless the run says
otherwise, the same for every implementation); no AuxK, no decoder
re-normalisation, so the comparison is of the model's compute. Switch steps add the
load-balancing loss. Before timing, each implementation is checked on ``validate_batch``
tokens: ours against the dense-and-mask reference (reconstruction and every gradient),
the peers against ``reference.encode_topk`` + ``reference.decode`` run on their weights.

What it leaves out: timing and memory (``measure.py``), which cases to run (``runner.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from switch_sae import reference
from switch_sae.models.switch import SwitchSAE, SwitchSAEConfig
from switch_sae.models.losses import load_balancing, mse
from .measure import check_close

LR = 1e-4  # any small rate: the step's cost does not depend on it


@dataclass
class TrainCase:
    """A ready-to-time training step and what its validation found."""

    step: Callable[[], None]
    validation: dict
    phases: list[tuple[float, float, float]] = field(default_factory=list)
    """(forward, backward, optimiser) seconds of every call of ``step``."""
    param_mb: float = 0.0
    """Size of the trained parameters: a step's gradients and each Adam state are as large."""


def size_mb(params: list[nn.Parameter]) -> float:
    return sum(p.numel() * p.element_size() for p in params) / 2**20


def timed_step(params: list[nn.Parameter], loss_fn: Callable[[], Tensor], fused: bool) -> tuple[Callable[[], None], list]:
    """Wrap ``loss_fn`` into a full Adam step that records its phase times."""
    opt = torch.optim.Adam(params, lr=LR, fused=fused or None)
    phases: list[tuple[float, float, float]] = []

    def step() -> None:
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    return step, phases


# ------------------------------------------------------------------ Switch: ours and dense-and-mask


def switch_model(d_in: int, d_sae: int, n_experts: int, k: int) -> SwitchSAE:
    return SwitchSAE(SwitchSAEConfig(d_in=d_in, n_experts=n_experts, d_expert=d_sae // n_experts, k=k))


def routed_forward(model: SwitchSAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ours: ``x_hat [batch, d_in]``, router probs ``[batch, n_experts]``, experts ``[batch, 1]``."""
    out = model(x)
    return out.x_hat, out.router_probs, out.experts


def dense_mask_forward(model: SwitchSAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's reference computation on the same parameters."""
    x_hat, _, _, probs, experts = reference.switch_forward(
        x, model.encoder_weight(), model.b_enc, model.W_dec, model.W_router, model.b_router,
        model.b_dec, model.cfg.k, model.cfg.n_active,
    )
    return x_hat, probs, experts


SWITCH_FORWARDS = {"switch_sae": routed_forward, "dense_mask_reference": dense_mask_forward}


def switch_loss(x: Tensor, x_hat: Tensor, probs: Tensor, experts: Tensor) -> Tensor:
    return mse(x, x_hat) + 0.01 * load_balancing(probs, experts)


def validate_switch(forward: Callable, model: SwitchSAE, x: Tensor) -> dict:
    """Compare ``forward``'s reconstruction and every parameter gradient with the reference."""
    results = {}
    for name, fn in (("got", forward), ("want", dense_mask_forward)):
        model.zero_grad(set_to_none=True)
        x_hat, probs, experts = fn(model, x)
        switch_loss(x, x_hat, probs, experts).backward()
        results[name] = (x_hat.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    (x_hat, grads), (x_hat_ref, grads_ref) = results["got"], results["want"]
    errors = {"x_hat": check_close("x_hat", x_hat, x_hat_ref)}
    for name, grad in grads_ref.items():
        errors[f"grad_{name}"] = check_close(f"grad of {name}", grads[name], grad)
    return {"against": "reference.switch_forward", "max_abs_err": max(errors.values())}


def build_switch(impl: str, spec: dict, x: Tensor) -> TrainCase:
    model = switch_model(spec["d_in"], spec["d_sae"], spec["n_experts"], spec["k"])
    forward = SWITCH_FORWARDS[impl]
    if impl == "dense_mask_reference":
        validation = {"against": "itself (it is the reference)"}
    else:
        validation = validate_switch(forward, model, x[: spec["validate_batch"]])
    params = list(model.parameters())
    step, phases = timed_step(params, lambda: switch_loss(x, *forward(model, x)), spec["fused_adam"])
    return TrainCase(step, validation, phases, size_mb(params))


# ------------------------------------------------------------------ dense TopK SAEs of other libraries


def validate_topk(forward: Callable[[Tensor], Tensor], x: Tensor, W_enc: Tensor, b_enc: Tensor,
                  W_dec: Tensor, b_dec: Tensor, k: int) -> dict:
    """Check a dense TopK SAE ``forward`` against the reference ops run with one expert.

    W_enc, W_dec: ``[d_sae, d_in]`` (encoder rows, unit-or-not decoder rows); b_enc ``[d_sae]``.
    """
    batch = x.shape[0]
    with torch.no_grad():
        order = torch.arange(batch)
        offsets = torch.tensor([0, batch])
        values, indices = reference.encode_topk(x, W_enc[None], b_enc[None], b_dec, order, offsets, 1, k, batch)
        want = reference.decode(values, indices, W_dec) + b_dec
        got = forward(x)
    return {"against": "reference.encode_topk + reference.decode",
            "max_abs_err": check_close("x_hat", got, want)}


def build_saelens(spec: dict, x: Tensor) -> TrainCase:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=spec["d_in"], d_sae=spec["d_sae"], k=spec["k"]))
    with torch.no_grad():  # non-zero biases so that validation exercises them
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    # With rescale_acts_by_decoder_norm (its training default), pre-activations are scaled
    # by the decoder row norms and the code divided by them before decoding.
    norms = sae.W_dec.detach().norm(dim=-1, keepdim=True)  # [d_sae, 1]
    validation = validate_topk(
        sae, x[: spec["validate_batch"]], sae.W_enc.detach().T * norms, sae.b_enc.detach() * norms[:, 0],
        sae.W_dec.detach() / norms, sae.b_dec.detach(), spec["k"],
    )

    def loss() -> Tensor:
        step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                    n_training_steps=0, is_logging_step=False)
        return sae.training_forward_pass(step_input).loss

    params = list(sae.parameters())
    step, phases = timed_step(params, loss, spec["fused_adam"])
    return TrainCase(step, validation, phases, size_mb(params))


def build_dictlearning(spec: dict, x: Tensor) -> TrainCase:
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(spec["d_in"], spec["d_sae"], spec["k"])
    with torch.no_grad():
        ae.encoder.bias.normal_(0, 0.1)
        ae.b_dec.normal_(0, 0.1)
    validation = validate_topk(
        ae, x[: spec["validate_batch"]], ae.encoder.weight.detach(), ae.encoder.bias.detach(),
        ae.decoder.weight.detach().T, ae.b_dec.detach(), spec["k"],
    )
    params = list(ae.parameters())
    step, phases = timed_step(params, lambda: mse(x, ae(x)), spec["fused_adam"])
    return TrainCase(step, validation, phases, size_mb(params))


PEER_MODULES = {"saelens_topk": "sae_lens", "dictlearning_topk": "dictionary_learning"}


def build_train_case(spec: dict, x: Tensor) -> TrainCase:
    """The training step named by ``spec["impl"]`` at the shapes in ``spec``."""
    impl = spec["impl"]
    if impl in SWITCH_FORWARDS:
        return build_switch(impl, spec, x)
    if impl == "saelens_topk":
        return build_saelens(spec, x)
    if impl == "dictlearning_topk":
        return build_dictlearning(spec, x)
    raise ValueError(f"impl must be one of {sorted([*SWITCH_FORWARDS, *PEER_MODULES])}, got {impl!r}")
