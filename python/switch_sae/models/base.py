"""The interface every SAE in switch_sae shares, and the save/load format.

An SAE maps activations ``x [batch, d_in]`` to a code and back. Sparse architectures
(Switch, TopK, BatchTopK) return a ``SparseCode`` of ``k`` (value, feature id) pairs per
token; the L1 family (ReLU, Gated, JumpReLU) returns dense ``acts [batch, d_sae]``.
``W_dec_flat [d_sae, d_in]`` is always the global dictionary with unit-norm rows.

On disk an SAE is a folder with ``cfg.json`` (the config dataclass plus ``architecture``
and the SHA-256 of the weights) and ``model.safetensors`` (parameters and buffers, with
the same config in its metadata), both written atomically; an expert-parallel run writes
one such folder per process plus ``shards.json`` (``sharded.py``), and ``load`` assembles it. Loading checks the checksum,
the type of every config field, that ``cfg.json`` still says what the weights were saved
with (an edited ``k`` or ``dtype`` would otherwise load as a different model), and every
tensor's name, shape and dtype; each error names the file.

Every architecture owns its training objective: ``training_terms(x, out, dead)`` returns
the weighted loss terms (reconstruction plus whatever the architecture adds, with the
coefficients on its own config), so the trainer only sums, steps and logs them.

What it leaves out: the optimisation loop (``switch_sae.training``) and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..utils.io import (
    DamagedFileError,
    atomic_write_json,
    atomic_write_safetensors,
    check_sha256,
    check_tensors,
    read_json_object,
    read_safetensors,
    read_safetensors_metadata,
    sha256_file,
)
from ..utils.checks import check_int
from ..utils.typed_config import config_from_dict
from . import losses
from .sharded import is_sharded, read_shards

try:  # TransformerLens hook points, so users can hook an SAE like any TL module.
    from transformer_lens.hook_points import HookPoint

    try:  # TransformerLens >= 3.x exports it at the top; 4.0 removed it from hook_points
        from transformer_lens import HookedRootModule
    except ImportError:
        from transformer_lens.hook_points import HookedRootModule
except ImportError:  # the [lm] extra is not installed: plain identities, same names
    HookPoint = nn.Identity  # type: ignore[assignment,misc]
    HookedRootModule = nn.Module  # type: ignore[assignment,misc]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUM_KEY = "weights_sha256"  # in cfg.json: SHA-256 of model.safetensors
CONFIG_METADATA = "switch_sae.config"  # in model.safetensors' metadata: cfg.json's content


class SparseCode(NamedTuple):
    """k active features per token."""

    values: Tensor  # [batch, k] activations (gated, for Switch SAEs)
    indices: Tensor  # [batch, k] int64 global feature ids in [0, d_sae)


class ForwardOutput(NamedTuple):
    """Everything one forward pass produces that training and evaluation need."""

    x_hat: Tensor  # [batch, d_in] reconstruction
    code: SparseCode | None  # sparse code (Switch / TopK family), else None
    acts: Tensor | None  # dense [batch, d_sae] code (L1 family), else None
    router_probs: Tensor | None = None  # [batch, n_experts] (Switch only)
    experts: Tensor | None = None  # [batch, n_active] int64 (Switch only)
    aux: dict[str, Tensor] | None = None  # architecture-specific inputs of training_terms
    gates: Tensor | None = None  # [batch, n_active] multipliers of each expert's values (Switch only)

    @property
    def values(self) -> Tensor:
        assert self.code is not None, "this architecture has a dense code: use .acts"
        return self.code.values

    @property
    def indices(self) -> Tensor:
        assert self.code is not None, "this architecture has a dense code: use .acts"
        return self.code.indices


DECODER_BLOCK_BYTES = 2 << 20
"""Bytes of one tensor's block of decoder rows in ``remove_decoder_parallel_grad_`` on the
CPU. On the whole ``[d_sae, d_in]`` matrix the projection streams the gradient, the weights
and two temporaries of that size through memory (85 ms at d_sae 65,536, d_in 512 on 2
cores); on blocks whose gradient, weights and temporaries fit the cache together, each
crosses the memory bus once (12 ms). 2 MiB measured fastest here (1.2x faster than 0.25 or
8 MiB)."""


def row_blocks(W: Tensor) -> list[slice]:
    """Row ranges of ``W [rows, d_in]`` of about ``DECODER_BLOCK_BYTES`` each; one range off
    the CPU, where kernel launches, not cache, are what count."""
    rows = W.shape[0]
    if W.device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, DECODER_BLOCK_BYTES // (W.shape[1] * W.element_size()))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclasses.dataclass(kw_only=True)
class SAEConfig:
    """Fields every SAE config has (keyword-only, so subclasses may add required ones)."""

    d_in: int
    """Width of the activations being reconstructed."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64, bfloat16 or float16."""
    device: str = "cpu"
    """Device for the parameters."""
    hook_name: str = ""
    """Where the activations came from (e.g. blocks.8.hook_resid_post); metadata for interop."""
    model_name: str = ""
    """Which model the activations came from; metadata for interop."""

    def __post_init__(self) -> None:
        check_int("d_in", self.d_in)
        parse_dtype(self.dtype)


_REGISTRY: dict[str, type["SAE"]] = {}


def register_architecture(cls: type["SAE"]) -> type["SAE"]:
    """Class decorator: make ``SAE.load`` able to rebuild this architecture by name."""
    _REGISTRY[cls.architecture] = cls
    return cls


def architectures() -> dict[str, type["SAE"]]:
    """Every registered architecture by name (``"switch"``, ``"topk"``, ...), as a new dict."""
    return dict(_REGISTRY)


class SAE(HookedRootModule):
    """Base class: ``x -> code -> x_hat``, with a unit-norm global dictionary."""

    architecture: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        # Scanning inputs for NaN/inf costs one pass over x (and a host sync on GPU); it is
        # on by default because a non-finite input silently poisons TopK and training.
        # Under torch.compile the scan is skipped (data-dependent control flow).
        self.check_finite_inputs = True
        self.hook_sae_input = HookPoint()  # [batch, d_in]
        self.hook_sae_acts_post = HookPoint()  # [batch, k] sparse values or [batch, d_sae]
        self.hook_sae_recons = HookPoint()  # [batch, d_in]

    def setup_hooks(self) -> None:
        """Register the hook points with TransformerLens; call at the end of a subclass ``__init__``."""
        if HookedRootModule is not nn.Module:
            self.setup()

    # -- the interface -------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        raise NotImplementedError

    @property
    def W_dec_flat(self) -> Tensor:
        """``[d_sae, d_in]`` dictionary; row i is feature i's unit-norm direction."""
        raise NotImplementedError

    @property
    def encoder_width(self) -> float:
        """The width in the learning-rate law ``2e-4 / sqrt(width / 2^14)``: ``d_sae`` for a
        dense dictionary (routed models say otherwise)."""
        return self.d_sae

    def encode(self, x: Tensor) -> SparseCode | Tensor:
        raise NotImplementedError

    def encode_dense(self, x: Tensor) -> Tensor:
        """``[batch, d_sae]`` feature activations, for analysis on small batches only."""
        raise NotImplementedError

    def decode(self, code: SparseCode | Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> ForwardOutput:
        raise NotImplementedError

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted loss terms of one forward pass ``out`` of ``x [batch, d_in]``; the loss is their sum.

        ``mse`` (summed over d_in, mean over tokens) is always first; architectures add
        their own terms, each weighted in units of ``losses.weight_unit(x)`` so that its
        coefficient means the same thing at any activation scale. ``dead`` is the trainer's
        ``[d_sae]`` bool mask of latents that have not fired for a while (None: unknown).
        """
        return {"mse": losses.mse(x, out.x_hat)}

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every dictionary row to unit norm (after each optimiser step)."""
        W = self.W_dec_flat
        W /= W.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)

    @torch.no_grad()
    def remove_decoder_parallel_grad_(self) -> None:
        """Drop from each decoder-row gradient its component along the row (before a step),
        so the step moves along the unit sphere (paper, appendix A)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        W = self.W_dec_flat
        G = grad.view(W.shape)
        for rows in row_blocks(W):  # each block's product and temporaries stay in cache
            g, w = G[rows], W[rows]
            g -= (g * w).sum(dim=-1, keepdim=True) * w

    def check_input(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """Validate ``x [..., d_in]``; return it flattened to ``[batch, d_in]`` in the model
        dtype, and its leading shape (to restore on the outputs)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape [..., d_in={self.d_in}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        device = self.W_dec_flat.device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the SAE is on {device}; move one of them")
        if self.check_finite_inputs and not torch.compiler.is_compiling() and not torch.isfinite(x).all():
            raise ValueError(
                "x contains NaN or inf; clean the activations first "
                "(or set sae.check_finite_inputs = False to skip this scan)"
            )
        return x.reshape(-1, self.d_in).to(self.W_dec_flat.dtype).contiguous(), x.shape[:-1]

    # -- persistence -----------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **dataclasses.asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``cfg.json`` + ``model.safetensors`` into ``directory`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach() for name, t in self.state_dict().items()}
        config = self.config_dict()
        metadata = {CONFIG_METADATA: json.dumps(config, sort_keys=True)}
        weights = atomic_write_safetensors(tensors, directory / WEIGHTS_FILE, metadata=metadata)
        atomic_write_json({**config, CHECKSUM_KEY: sha256_file(weights)}, directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "SAE":
        """Rebuild an SAE saved by ``save``; never unpickles. Damage raises naming the file."""
        directory = Path(directory)
        state = None
        if is_sharded(directory):  # written by an expert-parallel run: assemble the whole SAE
            config_folder, state = read_shards(directory)
        else:
            config_folder = directory
        cfg_path, weights_path = config_folder / CONFIG_FILE, config_folder / WEIGHTS_FILE
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: not a saved switch_sae SAE folder")
        target, cfg_dict = read_saved_config(config_folder)
        if cls is not SAE and not issubclass(target, cls):
            raise ValueError(f"{directory} holds a {target.architecture!r} SAE, not a {cls.architecture!r} one")
        if device is not None:
            cfg_dict["device"] = str(device)
        cfg = config_from_dict(target.config_class, cfg_dict, cfg_path)
        try:
            model = target(cfg)
        except (RuntimeError, ValueError) as err:  # e.g. a device this machine lacks
            raise ValueError(f"{cfg_path}: cannot build the SAE it describes: {err}") from err
        if state is None:
            load_weights(model, weights_path)
        else:
            check_tensors(state, model.state_dict(), directory)
            model.load_state_dict(state, strict=True)
        return model


def read_saved_config(directory: str | Path) -> tuple[type["SAE"], dict[str, Any]]:
    """The architecture and config fields of a saved SAE, after checking the field types,
    ``model.safetensors`` against the checksum ``cfg.json`` records, and the config against
    the one the weights were saved with.

    A folder saved before checksums existed loads with a warning.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    cfg_dict = read_json_object(cfg_path)
    checksum = cfg_dict.pop(CHECKSUM_KEY, None)
    architecture = cfg_dict.pop("architecture", None)
    if not isinstance(architecture, str) or architecture not in _REGISTRY:
        raise DamagedFileError(f"{cfg_path}: unknown architecture {architecture!r}; known: {sorted(_REGISTRY)}")
    target = _REGISTRY[architecture]
    config_from_dict(target.config_class, cfg_dict, cfg_path)  # types and ranges, naming the field
    metadata = read_safetensors_metadata(weights_path)
    if checksum is None and CONFIG_METADATA in metadata:  # saved with a checksum that is gone
        raise DamagedFileError(f"{cfg_path} lacks the {CHECKSUM_KEY} that {weights_path} was saved with")
    if checksum is None:
        warnings.warn(
            f"{cfg_path} records no checksum of {WEIGHTS_FILE} (saved by an older switch_sae), "
            "so damage to the weights cannot be detected; save the SAE again to add one",
            stacklevel=3,
        )
        return target, cfg_dict
    check_sha256(weights_path, checksum, cfg_path)
    try:
        saved_with = json.loads(metadata[CONFIG_METADATA])
    except (KeyError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{weights_path} lacks the config it was saved with") from err
    current = {"architecture": architecture, **cfg_dict}
    if current != saved_with:
        diff = {k: (current.get(k), saved_with.get(k)) for k in current.keys() | saved_with.keys()
                if current.get(k) != saved_with.get(k)}
        raise DamagedFileError(
            f"{cfg_path} was edited after saving: (cfg.json, saved with {WEIGHTS_FILE}) differ in {diff}; "
            "a config must match its weights (change a loaded model's cfg and save it again instead)"
        )
    return target, cfg_dict


def load_weights(model: SAE, path: str | Path) -> None:
    """Load a safetensors file into ``model`` after checking every name, shape and dtype."""
    state, _ = read_safetensors(path)
    check_tensors(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True)
