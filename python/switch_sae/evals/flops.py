"""FLOP and parameter accounting per token, and FLOP-/width-matched Switch configurations.

Conventions: a multiply-add is 2 FLOPs, any other elementwise operation (add, compare,
exp, ReLU, gate multiply) is 1, and a TopK over ``n`` candidates is counted as ``n``
comparisons. Counts are per token for the forward and backward passes; work done once per
optimiser step (Adam, decoder renormalisation, removing the parallel gradient component,
clipping, the Scale-SAE encoder transform) is listed separately and amortised over the
batch by ``FlopCount.step_per_token``.

What the counts assume about the implementation:
- Switch, TopK and BatchTopK decode with a gather-sum (``2 k d_in``) and, by default, have a
  sparse backward (``ops.encode_backward``/``ops.decode_backward``: only the ``k`` active
  features, ``n_active * k`` candidate rows for the encoder with multi-expert activation).
  ``sparse_backward=False`` counts a dense-autograd backward instead (``d_sae`` everywhere).
- The L1 family (ReLU, JumpReLU, Gated) encodes and decodes with dense matmuls.
- Adam costs ``ADAM_FLOPS_PER_PARAM`` per parameter per step.

Two comparisons from the paper: *FLOP-matched* gives each expert the dense baseline's width
(same encoder FLOPs per token, ``n_experts`` times the features; with ``n_active`` experts per
token each is ``1/n_active`` of it); *width-matched* splits the baseline's ``d_sae`` over the
experts (same features, ``n_experts`` times fewer encoder FLOPs). ``matched_configs`` gives the
baseline and both counterparts, ``make_saes`` builds them: the one builder of this trio.

What it leaves out: memory traffic and measured speed (``benchmarks/``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import SAE, architectures
from ..models.switch import SwitchSAE, SwitchSAEConfig
from ..utils.checks import check_int, check_int_fields, is_int

ARCHITECTURES = ("switch", "topk", "batchtopk", "relu", "jumprelu", "gated")
SPARSE_FAMILY = ("switch", "topk", "batchtopk")
ADAM_FLOPS_PER_PARAM = 12  # two moment updates, bias corrections, sqrt, divide, step


@dataclass
class SAEShape:
    """The numbers FLOP and parameter counts depend on."""

    architecture: str
    """One of ARCHITECTURES."""
    d_in: int
    """Activation width."""
    d_sae: int
    """Total features (``n_experts * d_expert`` for Switch)."""
    k: int = 0
    """Active features per token (sparse family only)."""
    n_experts: int = 1
    """Experts (Switch only)."""
    n_active: int = 1
    """Experts selected per token (Switch only)."""
    use_encoder_bias: bool = True
    """Whether the encoder has a per-feature bias."""
    feature_scaling: bool = False
    """Scale-SAE feature scaling of the encoder (Switch only)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        check_int_fields(self, "d_in", "d_sae", "n_experts", "n_active")
        if self.architecture in SPARSE_FAMILY and not 1 <= self.k <= self.d_sae // self.n_experts:
            raise ValueError(f"k must be in [1, d_expert={self.d_sae // self.n_experts}] for {self.architecture!r}, got {self.k!r}")
        if self.d_sae % self.n_experts or self.n_active > self.n_experts:
            raise ValueError(
                f"n_experts={self.n_experts} must divide d_sae={self.d_sae} and be >= n_active={self.n_active}"
            )
        if self.architecture != "switch" and (self.n_experts, self.n_active, self.feature_scaling) != (1, 1, False):
            raise ValueError(f"n_experts, n_active and feature_scaling apply to 'switch' only, not {self.architecture!r}")

    @property
    def d_expert(self) -> int:
        return self.d_sae // self.n_experts


@dataclass
class FlopCount:
    """FLOPs of one architecture, term by term."""

    forward: dict[str, int]
    """Per token."""
    backward: dict[str, int]
    """Per token."""
    per_step: dict[str, int] = field(default_factory=dict)
    """Once per optimiser step, whatever the batch size."""

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        return sum(self.backward.values())

    def step_per_token(self, batch_size: int) -> float:
        """Forward + backward + the per-step work shared by ``batch_size`` tokens."""
        check_int("batch_size", batch_size)
        return self.forward_total + self.backward_total + sum(self.per_step.values()) / batch_size

    def to_dict(self, batch_size: int | None = None) -> dict[str, Any]:
        out = {**dataclasses.asdict(self), "forward_total": self.forward_total, "backward_total": self.backward_total}
        if batch_size is not None:
            out["step_per_token"] = self.step_per_token(batch_size)
        return out


def shape_of(obj: Any) -> SAEShape:
    """``SAEShape`` of an SAE, a config dataclass of a registered architecture, or a shape."""
    if isinstance(obj, SAEShape):
        return obj
    cfg = getattr(obj, "cfg", obj)
    architecture = getattr(obj, "architecture", None) if hasattr(obj, "cfg") else None
    if architecture is None:
        # Exact type first: one config class may subclass another's.
        registered = architectures().items()
        matches = [name for name, cls in registered if type(cfg) is cls.config_class]
        matches = matches or [name for name, cls in registered if isinstance(cfg, cls.config_class)]
        if not matches:
            raise TypeError(f"cannot tell the architecture of a {type(obj).__name__}; pass an SAE, its config or an SAEShape")
        architecture = matches[0]
    d_sae = getattr(cfg, "d_sae", None) or getattr(obj, "d_sae")
    is_switch = architecture == "switch"
    return SAEShape(
        architecture=architecture,
        d_in=cfg.d_in,
        d_sae=int(d_sae),
        k=int(getattr(cfg, "k", 0) or 0),
        n_experts=cfg.n_experts if is_switch else 1,
        n_active=cfg.n_active if is_switch else 1,
        use_encoder_bias=bool(getattr(cfg, "use_encoder_bias", not is_switch)),
        feature_scaling=bool(getattr(cfg, "feature_scaling", False)) if is_switch else False,
    )


def parameter_count(obj: Any) -> int:
    """Trainable parameters, from the formula of each architecture (see ``count_parameters``)."""
    s = shape_of(obj)
    d, M = s.d_in, s.d_sae
    count = 2 * M * d + d  # W_enc, W_dec, b_dec
    if s.architecture == "switch":
        count += s.n_experts * d + d  # W_router, b_router
        count += M if s.use_encoder_bias else 0
        count += d * d + s.n_experts if s.feature_scaling else 0
    elif s.architecture == "gated":
        count += 3 * M  # b_gate, b_mag, r_mag
    elif s.architecture == "jumprelu":
        count += 2 * M  # b_enc, threshold
    else:
        count += M if s.use_encoder_bias else 0
    return count


def count_parameters(model: Any) -> int:
    """Trainable parameters of an instantiated model (what ``parameter_count`` predicts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _forward(s: SAEShape) -> dict[str, int]:
    d, M, k = s.d_in, s.d_sae, s.k
    f: dict[str, int] = {}
    if s.architecture == "switch":
        N, rows = s.n_experts, s.n_active * s.d_expert  # candidate features per token
        f |= {"router_center": d, "router_matmul": 2 * N * d, "router_softmax": 3 * N, "router_topk": N}
        f |= {"encoder_center": d, "encoder_matmul": 2 * rows * d}
        f["encoder_bias"] = rows if s.use_encoder_bias else 0
        f["topk"] = rows + (s.n_active * k if s.n_active > 1 else 0)  # + merge of n_active top-k lists
        f |= {"activation": s.n_active * k, "gate": s.n_active * k}
    else:
        f |= {"encoder_center": d, "encoder_matmul": 2 * M * d}
        if s.architecture in ("topk", "batchtopk"):
            f |= {"encoder_bias": M if s.use_encoder_bias else 0, "topk": M, "activation": k}
        elif s.architecture == "relu":
            f |= {"encoder_bias": M, "activation": M}
        elif s.architecture == "jumprelu":
            f |= {"encoder_bias": M, "activation": 3 * M}  # ReLU, threshold compare, mask
        else:  # gated: shared matmul, gate bias+compare, magnitude scale+bias+ReLU, product
            f |= {"encoder_bias": 2 * M, "activation": 5 * M}
    sparse = s.architecture in SPARSE_FAMILY
    f["decoder_matmul"] = 2 * (k if sparse else M) * d
    f["decoder_bias"] = d
    return f


def _backward(s: SAEShape, sparse_backward: bool) -> dict[str, int]:
    d, M, k = s.d_in, s.d_sae, s.k
    sparse = s.architecture in SPARSE_FAMILY and sparse_backward
    active = k if sparse else M  # features whose gradients are computed
    enc_rows = s.n_active * k if sparse else (s.n_active * s.d_expert if s.architecture == "switch" else M)
    b = {
        "decoder_grad_code": 2 * active * d,
        "decoder_grad_W": 2 * active * d,
        "decoder_grad_bias": d,
        "activation_backward": enc_rows,
        "encoder_grad_W": 2 * enc_rows * d,
        "encoder_grad_x": 2 * enc_rows * d,  # feeds grad b_dec (the pre-bias)
        "encoder_grad_bias": d + (enc_rows if s.use_encoder_bias else 0),
    }
    if s.architecture == "switch":
        N = s.n_experts
        b["gate_backward"] = 3 * s.n_active * k  # grad_gate = sum grad*z; grad_z = grad*gate
        b["router_backward"] = 3 * N + 4 * N * d + d  # softmax; grad W_router and grad x; grad b_router
    if s.architecture == "gated":
        b["activation_backward"] += 4 * M
        b["gate_aux_decoder"] = 4 * M * d  # Gated SAE's auxiliary reconstruction through the gate path
    return b


def _per_step(s: SAEShape, n_params: int) -> dict[str, int]:
    d, M = s.d_in, s.d_sae
    step = {
        "adam": ADAM_FLOPS_PER_PARAM * n_params,
        "grad_clip": 2 * n_params,
        "decoder_parallel_grad_removal": 4 * M * d,
        "decoder_renormalise": 3 * M * d,
    }
    if s.feature_scaling:  # encoder_weight(): row means, T @ mean, (1+w) W - w A_LP; backward ~ 2x
        transform = 4 * M * d + 2 * s.n_experts * d * d
        step["feature_scaling"] = 3 * transform
    return step


def flop_count(obj: Any, *, sparse_backward: bool = True) -> FlopCount:
    """FLOPs per token of forward and backward, and per step, of an SAE, config or shape."""
    s = shape_of(obj)
    return FlopCount(forward=_forward(s), backward=_backward(s, sparse_backward), per_step=_per_step(s, parameter_count(s)))


def training_flops(obj: Any, tokens: int, batch_size: int, *, sparse_backward: bool = True) -> float:
    """Total FLOPs to train on ``tokens`` tokens in batches of ``batch_size``."""
    return flop_count(obj, sparse_backward=sparse_backward).step_per_token(batch_size) * tokens


def _switch_like(baseline: Any, n_experts: int, d_expert: int, overrides: dict[str, Any]) -> SwitchSAEConfig:
    s = shape_of(baseline)
    if s.architecture not in SPARSE_FAMILY:
        raise ValueError(f"the baseline must have a k (topk, batchtopk or switch), got {s.architecture!r}")
    cfg = getattr(baseline, "cfg", baseline)
    carried = {name: getattr(cfg, name) for name in ("dtype", "device", "hook_name", "model_name") if hasattr(cfg, name)}
    return SwitchSAEConfig(**{"d_in": s.d_in, "n_experts": n_experts, "d_expert": d_expert, "k": s.k, **carried, **overrides})


def flop_matched_config(baseline: Any, n_experts: int, **overrides: Any) -> SwitchSAEConfig:
    """Switch config with the dense ``baseline``'s encoder FLOPs per token (plus a router of
    ``2 n_experts d_in``): each token's ``n_active`` experts together are as wide as the
    baseline, so ``d_expert = d_sae / n_active`` and there are ``n_experts / n_active`` times
    the features. With one active expert, each expert is as wide as the baseline (the paper)."""
    d_sae, n_active = shape_of(baseline).d_sae, overrides.get("n_active", 1)
    if not is_int(n_active) or n_active < 1 or d_sae % n_active:
        raise ValueError(
            f"n_active={n_active!r} must be a positive integer dividing the baseline's d_sae={d_sae}: the "
            "n_active experts a token uses share the baseline's encoder FLOPs, so each is d_sae / n_active wide"
        )
    return _switch_like(baseline, n_experts, d_sae // n_active, overrides)


def width_matched_config(baseline: Any, n_experts: int, **overrides: Any) -> SwitchSAEConfig:
    """Switch config with the ``baseline``'s total ``d_sae`` split over ``n_experts`` experts."""
    d_sae = shape_of(baseline).d_sae
    if not is_int(n_experts) or n_experts < 1 or d_sae % n_experts:
        raise ValueError(f"n_experts must be a positive integer dividing the baseline's d_sae={d_sae}, got {n_experts!r}")
    return _switch_like(baseline, n_experts, d_sae // n_experts, overrides)


def matched_configs(baseline: Any, n_experts: int, **switch_overrides: Any) -> dict[str, Any]:
    """The dense ``baseline`` (a TopK-family config) and its Switch counterparts' configs:
    ``topk`` (or the baseline's architecture), ``switch-flop`` (``flop_matched_config``) and
    ``switch-width`` (``width_matched_config``); ``switch_overrides`` go to both Switch
    configs (e.g. ``n_active``)."""
    return {
        shape_of(baseline).architecture: baseline,
        "switch-flop": flop_matched_config(baseline, n_experts, **switch_overrides),
        "switch-width": width_matched_config(baseline, n_experts, **switch_overrides),
    }


def make_saes(baseline: Any, n_experts: int, *, seed: int = 0, **switch_overrides: Any) -> dict[str, SAE]:
    """The SAEs of ``matched_configs``, freshly initialised, each after
    ``torch.manual_seed(seed + i)``, ``i`` its position, so a comparison is reproducible."""
    saes = {}
    for i, (name, cfg) in enumerate(matched_configs(baseline, n_experts, **switch_overrides).items()):
        torch.manual_seed(seed + i)
        saes[name] = SwitchSAE(cfg) if name.startswith("switch-") else architectures()[name](cfg)
    return saes
