"""Export our SAEs to SAELens's on-disk format, and import SAELens SAEs that map exactly.

SAELens (v6) stores an SAE as a folder with ``cfg.json`` (``SAEConfig.to_dict()``: ``d_in``,
``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``architecture``, architecture fields, a ``metadata`` block with ``hook_name``/``model_name``
and ``sae_lens_version``) and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and per-architecture keys.
``sae_lens.SAE.load_from_disk(folder)`` reads what ``export_to_saelens`` writes.

Exact mappings (same reconstructions, up to float rounding):

| ours | SAELens | notes |
|---|---|---|
| topk | topk | ``b_enc`` written as zeros when we have none |
| switch, n_experts=1 | topk | the one-expert softmax is 1, so the gate is exactly 1 |
| batchtopk (eval mode) | jumprelu | a per-feature threshold equal to our global one, as SAELens saves BatchTopK |
| relu | standard | |
| jumprelu | jumprelu | ``threshold = exp(log_threshold)`` |
| gated | gated | ``b_gate``, ``b_mag``, ``r_mag`` as is |

A Switch SAE with more than one expert is **not** representable: SAELens's TopK takes the top
k over all ``d_sae`` features, while a Switch SAE takes the top k inside the expert its router
picks and scales the code by that expert's probability; no SAELens architecture has a router.
``export_to_saelens`` refuses it unless ``approximate=True``, which writes the dictionary as a
plain TopK over all features (router and gate dropped; ``metadata.switch_sae_exact = false``).
That file is for tools that only read the dictionary (``W_dec``, ``W_enc``), not for
reconstructions; use the SAEBench wrapper (``interop.saebench``) to run a Switch SAE exactly.

Import (``import_from_saelens``): topk, standard, jumprelu, gated. Our dictionaries have
unit-norm rows, so decoder norms are folded into the encoder, which is exact for ReLU,
JumpReLU and Gated (positively homogeneous), and for TopK only when SAELens selects on
norm-rescaled pre-activations (``rescale_acts_by_decoder_norm``) or the norms are already 1.
``apply_b_dec_to_input=False`` is folded into the encoder bias. Activation normalisation other
than ``none`` is refused (it is not a fixed affine map).

What it leaves out: SAELens's training configs, sparsity files and Hugging Face downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..models import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, SwitchSAE, TopKSAE
from ..models.base import SAE
from ..utils.io import atomic_write_json, atomic_write_safetensors

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # marks the v6 config layout (older ones get renamed on load)
NORM_TOLERANCE = 1e-4  # decoder rows this close to unit norm count as normalised


def _switch_tensors(sae: SwitchSAE, approximate: bool) -> tuple[str, dict[str, Tensor]]:
    if sae.cfg.n_experts > 1 and not approximate:
        raise ValueError(
            f"a Switch SAE with n_experts={sae.cfg.n_experts} cannot be written exactly in SAELens format: "
            "SAELens has no router, and its TopK would pick the top k over all experts instead of inside the "
            "routed one (and drop the router-probability gate). Pass approximate=True to export the dictionary "
            "as a plain TopK SAE anyway (not for reconstructions), or use interop.saebench.SAEBenchWrapper to "
            "run it exactly."
        )
    W_enc = sae.encoder_weight().reshape(sae.d_sae, sae.d_in)  # [d_sae, d_in]
    b_enc = sae.b_enc.reshape(-1) if sae.b_enc is not None else W_enc.new_zeros(sae.d_sae)
    return "topk", {"W_enc": W_enc.T, "b_enc": b_enc}


def _saelens_tensors(sae: SAE, approximate: bool) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """SAELens architecture name, its architecture-specific tensors, and extra cfg fields."""
    extra: dict[str, Any] = {}
    if isinstance(sae, SwitchSAE):
        arch, tensors = _switch_tensors(sae, approximate)
        extra = {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    elif isinstance(sae, TopKSAE):
        b_enc = sae.b_enc if sae.b_enc is not None else sae.W_enc.new_zeros(sae.d_sae)
        arch, tensors = "topk", {"W_enc": sae.W_enc.T, "b_enc": b_enc}
        extra = {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    elif isinstance(sae, BatchTopKSAE):
        if float(sae.threshold) < 0:
            raise ValueError(
                "this BatchTopK SAE has no inference threshold yet (threshold < 0: it was never trained); "
                "SAELens runs BatchTopK as JumpReLU with that threshold, so there is nothing exact to export"
            )
        b_enc = sae.b_enc if sae.b_enc is not None else sae.W_enc.new_zeros(sae.d_sae)
        threshold = torch.full((sae.d_sae,), float(sae.threshold), dtype=sae.W_enc.dtype)
        arch, tensors = "jumprelu", {"W_enc": sae.W_enc.T, "b_enc": b_enc, "threshold": threshold}
    elif isinstance(sae, ReLUSAE):
        arch, tensors = "standard", {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc}
    elif isinstance(sae, JumpReLUSAE):
        arch, tensors = "jumprelu", {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "threshold": sae.threshold}
    elif isinstance(sae, GatedSAE):
        arch = "gated"
        tensors = {"W_enc": sae.W_enc.T, "b_gate": sae.b_gate, "b_mag": sae.b_mag, "r_mag": sae.r_mag}
    else:
        raise TypeError(f"no SAELens mapping for a {type(sae).__name__} (architecture {sae.architecture!r})")
    return arch, tensors, extra


def export_to_saelens(sae: SAE, directory: str | Path, *, approximate: bool = False) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    Raises ValueError for a multi-expert Switch SAE unless ``approximate=True`` (see the
    module docstring for what the approximation drops).
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a switch_sae SAE, got {type(sae).__name__}")
    arch, tensors, extra = _saelens_tensors(sae, approximate)
    tensors = {**tensors, "W_dec": sae.W_dec_flat, "b_dec": sae.b_dec}
    exact = not (isinstance(sae, SwitchSAE) and sae.cfg.n_experts > 1)
    cfg = sae.cfg
    config = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "model_from_pretrained_kwargs": {},
            "switch_sae_architecture": sae.architecture,
            "switch_sae_exact": exact,
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_safetensors(weights, directory / SAELENS_WEIGHTS)
    atomic_write_json(config, directory / SAELENS_CFG)
    return directory


def _fold_input_bias(state: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """Turn ``x @ W_enc + b`` into ``(x - b_dec) @ W_enc + b'`` (our encoders subtract b_dec)."""
    if cfg.get("apply_b_dec_to_input", True):
        return
    shift = state["b_dec"] @ state["W_enc"]  # [d_sae]
    if cfg["architecture"] == "gated":
        state["b_gate"] = state["b_gate"] + shift
        state["b_mag"] = state["b_mag"] + shift * state["r_mag"].exp()
    else:
        state["b_enc"] = state["b_enc"] + shift


def _fold_decoder_norms(state: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """Make ``W_dec`` rows unit norm, scaling each feature's encoder side to compensate."""
    norms = state["W_dec"].norm(dim=-1)  # [d_sae]
    if bool(((norms - 1).abs() < NORM_TOLERANCE).all()):
        return
    if cfg["architecture"] == "topk" and not cfg.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(
            "this SAELens TopK SAE has decoder rows that are not unit norm and selects its top k on raw "
            "pre-activations; moving the norms into the encoder would change which features are selected, "
            "so it has no exact switch_sae equivalent"
        )
    if bool((norms <= 0).any()):
        raise ValueError("W_dec has an all-zero row; a unit-norm dictionary cannot represent it")
    state["W_dec"] = state["W_dec"] / norms.unsqueeze(-1)
    state["W_enc"] = state["W_enc"] * norms  # columns are features
    for name in ("b_enc", "b_gate", "b_mag", "threshold"):
        if name in state:
            state[name] = state[name] * norms


def import_from_saelens(directory: str | Path, *, device: str = "cpu") -> SAE:
    """Build one of our SAEs from a SAELens folder (topk, standard, jumprelu or gated)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a SAELens SAE folder")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ("topk", "standard", "jumprelu", "gated"):
        raise ValueError(f"{cfg_path}: SAELens architecture {arch!r} has no switch_sae equivalent")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is applied at run time and "
            "cannot be folded into our weights; fold it in SAELens first (fold_activation_norm_scaling_factor)"
        )
    if cfg.get("reshape_activations", "none") != "none" or cfg.get("hook_head_index") is not None:
        raise ValueError(f"{cfg_path}: attention-head SAEs (hook_z reshaping) are not supported")
    state = {name: t.double() for name, t in load_file(str(weights_path)).items()}  # fold in float64
    _fold_input_bias(state, cfg)
    _fold_decoder_norms(state, cfg)
    metadata = cfg.get("metadata", {})
    common = {
        "d_in": int(cfg["d_in"]),
        "d_sae": int(cfg["d_sae"]),
        "dtype": cfg.get("dtype", "float32"),
        "device": device,
        "hook_name": metadata.get("hook_name") or cfg.get("hook_name") or "",
        "model_name": metadata.get("model_name") or cfg.get("model_name") or "",
    }
    ours: dict[str, Tensor] = {"W_enc": state["W_enc"].T, "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if arch == "topk":
        model: SAE = TopKSAE(TopKSAE.config_class(**common, k=int(cfg["k"])))
        ours["b_enc"] = state["b_enc"]
    elif arch == "standard":
        model = ReLUSAE(ReLUSAE.config_class(**common))
        ours["b_enc"] = state["b_enc"]
    elif arch == "jumprelu":
        if bool((state["threshold"] <= 0).any()):
            raise ValueError(f"{weights_path}: JumpReLU thresholds must be positive (ours are log-parametrised)")
        model = JumpReLUSAE(JumpReLUSAE.config_class(**common))
        ours |= {"b_enc": state["b_enc"], "log_threshold": state["threshold"].log()}
    else:
        model = GatedSAE(GatedSAE.config_class(**common))
        ours |= {name: state[name] for name in ("b_gate", "b_mag", "r_mag")}
    dtype = model.W_dec_flat.dtype
    model.load_state_dict({name: t.to(dtype) for name, t in ours.items()}, strict=True)
    return model


def is_exact_export(directory: str | Path) -> bool:
    """Whether a folder written by ``export_to_saelens`` reproduces the SAE's reconstructions."""
    metadata = json.loads((Path(directory) / SAELENS_CFG).read_text()).get("metadata", {})
    return bool(metadata.get("switch_sae_exact", True))

