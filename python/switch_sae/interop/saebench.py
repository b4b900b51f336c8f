"""A dense wrapper that makes any of our SAEs look like a SAEBench custom SAE.

SAEBench's evals take ``(name, sae)`` pairs where ``sae`` is an ``nn.Module`` with
``encode(x) -> [..., d_sae]``, ``decode(f) -> [..., d_in]``, ``forward``, ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_enc [d_sae]``, ``b_dec [d_in]``, ``device``,
``dtype``, ``check_decoder_norms()`` and a ``cfg`` with the fields of its ``CustomSAEConfig``
(``model_name``, ``d_in``, ``d_sae``, ``hook_layer``, ``hook_name``, ``architecture``, ...).

``encode`` runs our SAE (routing included), so a Switch SAE is evaluated exactly; the code is
returned dense, as SAEBench expects. ``decode`` is ``f @ W_dec + b_dec``, which equals our
gather-sum decoder for every architecture. ``W_enc`` of a Switch SAE is its experts' encoders
side by side (for the encoder-geometry metrics); routing is not expressed by it.

What it leaves out: SAEBench itself (not a dependency) and dictionary edits through the wrapper
(``W_dec``/``W_enc`` are views or copies of the wrapped SAE's weights, read-only by intent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import SAE


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's ``CustomSAEConfig`` (names and meanings as SAEBench uses them)."""

    model_name: str
    """TransformerLens name of the model the SAE reads."""
    d_in: int
    """Activation width."""
    d_sae: int
    """Dictionary size."""
    hook_layer: int
    """Layer of ``hook_name``."""
    hook_name: str
    """TransformerLens hook the SAE reads, e.g. blocks.8.hook_resid_post."""
    context_size: int | None = None
    """Tokens per context the SAE was trained on, if known."""
    hook_head_index: int | None = None
    """Attention head (None: whole activation)."""
    architecture: str = ""
    """Our architecture name (switch, topk, batchtopk, relu, jumprelu, gated)."""
    apply_b_dec_to_input: bool = True
    """Our encoders subtract b_dec first."""
    finetuning_scaling_factor: bool = False
    """Not used by our SAEs."""
    activation_fn_str: str = ""
    """Informational."""
    prepend_bos: bool = True
    """Whether contexts started with BOS during training."""
    normalize_activations: str = "none"
    """Our SAEs read raw activations."""
    dtype: str = "float32"
    """Parameter dtype name."""
    device: str = "cpu"
    """Parameter device."""
    dataset_path: str = ""
    """Training text, if known."""
    dataset_trust_remote_code: bool = True
    """SAEBench field; unused here."""
    seqpos_slice: tuple = (None,)
    """SAEBench field: all positions."""
    training_tokens: int = -100_000
    """SAEBench's placeholder for unknown."""
    sae_lens_training_version: str | None = None
    """SAEBench field; None for non-SAELens SAEs."""
    neuronpedia_id: str | None = None
    """SAEBench field."""
    activation_fn_kwargs: dict = field(default_factory=dict)
    """SAEBench field."""
    model_from_pretrained_kwargs: dict = field(default_factory=dict)
    """Keyword arguments SAEBench passes when loading the model."""
    metadata: Any = None
    """Newer SAEBench reads model/hook fields from ``cfg.metadata`` (a SAELens SAEMetadata)."""

    def __post_init__(self) -> None:
        if self.metadata is None:
            fields = {
                name: getattr(self, name)
                for name in ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                             "dataset_path", "model_from_pretrained_kwargs", "seqpos_slice", "neuronpedia_id")
            }
            try:  # the real class when SAELens is installed, so SAELens-side code sees what it expects
                from sae_lens.saes.sae import SAEMetadata

                self.metadata = SAEMetadata(**fields)
            except ImportError:
                self.metadata = SimpleNamespace(**fields)


def hook_layer_of(hook_name: str) -> int:
    """Layer number in a TransformerLens hook name (``blocks.8.hook_resid_post`` -> 8)."""
    match = re.search(r"\.(\d+)\.", hook_name)
    if match is None:
        raise ValueError(f"cannot read a layer from hook_name={hook_name!r}; pass hook_layer explicitly")
    return int(match.group(1))


class SAEBenchWrapper(nn.Module):
    """SAEBench custom-SAE interface around one of our SAEs (dense ``[..., d_sae]`` codes)."""

    def __init__(self, sae: SAE, *, model_name: str | None = None, hook_name: str | None = None,
                 hook_layer: int | None = None, **cfg_fields: Any) -> None:
        super().__init__()
        if not isinstance(sae, SAE):
            raise TypeError(f"sae must be a switch_sae SAE, got {type(sae).__name__}")
        self.sae = sae.eval()  # BatchTopK uses its inference threshold in eval mode
        hook_name = hook_name or sae.cfg.hook_name
        model_name = model_name or sae.cfg.model_name
        if not hook_name or not model_name:
            raise ValueError("hook_name and model_name are needed (set them in the SAE config or pass them)")
        self.cfg = SAEBenchConfig(
            model_name=model_name,
            d_in=sae.d_in,
            d_sae=sae.d_sae,
            hook_layer=hook_layer_of(hook_name) if hook_layer is None else hook_layer,
            hook_name=hook_name,
            architecture=sae.architecture,
            dtype=str(sae.W_dec_flat.dtype).removeprefix("torch."),
            device=str(sae.W_dec_flat.device),
            **cfg_fields,
        )
        self.device = sae.W_dec_flat.device
        self.dtype = sae.W_dec_flat.dtype

    @property
    def W_dec(self) -> Tensor:
        """``[d_sae, d_in]`` unit-norm rows (a view of the wrapped dictionary)."""
        return self.sae.W_dec_flat

    @property
    def W_enc(self) -> Tensor:
        """``[d_in, d_sae]`` encoder directions as columns."""
        W = self.sae.encoder_weight() if hasattr(self.sae, "encoder_weight") else self.sae.W_enc
        return W.reshape(self.cfg.d_sae, self.cfg.d_in).T

    @property
    def b_enc(self) -> Tensor:
        """``[d_sae]``: the encoder bias, zeros where the architecture has none (Gated: b_mag)."""
        for name in ("b_enc", "b_mag"):
            bias = getattr(self.sae, name, None)
            if bias is not None:
                return bias.reshape(-1)
        return self.W_dec.new_zeros(self.cfg.d_sae)

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> dense code ``[..., d_sae]``."""
        return self.sae.encode_dense(x.to(self.dtype))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``[..., d_sae]`` -> ``[..., d_in]``."""
        return feature_acts.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> "SAEBenchWrapper":
        super().to(*args, **kwargs)
        self.device, self.dtype = self.sae.W_dec_flat.device, self.sae.W_dec_flat.dtype
        self.cfg.device, self.cfg.dtype = str(self.device), str(self.dtype).removeprefix("torch.")
        return self

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """SAEBench's check: every decoder row has unit norm (looser for 16-bit dtypes)."""
        tolerance = 1e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-5
        norms = self.W_dec.float().norm(dim=-1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance, rtol=0))
