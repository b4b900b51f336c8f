"""The Python face of the ``switch_sae`` custom ops: loading, fake kernels, autograd.

After ``import switch_sae`` the compiled ops are callable as ``torch.ops.switch_sae.<op>``
from any codebase; the wrappers below add docstrings and fall back to
``switch_sae.reference`` (warning once) when the compiled extension is not installed.
``SWITCH_SAE_BACKEND=reference``, ``set_backend("reference")`` or ``with
use_backend("reference"):`` route the wrappers (and so every model) to the PyTorch twins
on any device, so a user can keep working while a kernel is suspect.
Schemas live in ``csrc/registration.cpp``; semantics are those of ``reference.py``.

What it leaves out: routing (``reference.route``, ordinary autograd) and the gate/merge
step, which are small dense tensor operations left to the model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import reference

# `pip install .` compiles against the torch already installed (build_backend/), so the
# same command that installed the package mends it after torch has changed.
REBUILD_HINT = (
    "Rebuild it against the installed torch with `pip install .` from the switch_sae "
    "source tree (or `make install`)."
)


class ExtensionMismatchError(ImportError):
    """The compiled extension was built against a different torch than the one running."""


def check_build_matches(built_torch: str, running_torch: str) -> None:
    """Refuse a binary built against another torch: its C++ ABI is not compatible."""
    if built_torch != running_torch:
        raise ExtensionMismatchError(
            f"switch_sae._C was built against torch {built_torch} but torch {running_torch} "
            f"is installed; loading it could crash or misbehave. {REBUILD_HINT} "
            "Set SWITCH_SAE_DISABLE_EXTENSION=1 to run on the (slow) reference path instead."
        )


def _load_extension() -> bool:
    """Import ``switch_sae._C`` (which registers the ops) if it exists and matches torch."""
    if os.environ.get("SWITCH_SAE_DISABLE_EXTENSION") == "1":
        return False
    try:
        build_info = importlib.import_module("switch_sae._build_info")
    except ImportError:
        return False
    check_build_matches(build_info.TORCH_VERSION, torch.__version__)
    importlib.import_module("switch_sae._C")
    return True


HAS_EXTENSION = _load_extension()
_warned = False

BACKENDS = ("extension", "reference")


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _check_backend(os.environ.get("SWITCH_SAE_BACKEND", "extension"), "SWITCH_SAE_BACKEND")


def set_backend(name: str) -> None:
    """Run the op wrappers on ``"extension"`` (the compiled kernels, when installed; the
    default) or ``"reference"`` (the plain PyTorch twins in ``reference.py``, any device)."""
    global _backend
    _backend = _check_backend(name, "backend")


def get_backend() -> str:
    """The backend ``set_backend`` chose (``"extension"`` falls back when it is not installed)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"):`` runs the enclosed ops on that backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _compiled() -> bool:
    """Whether the wrappers call the compiled ops now; warns once if they cannot."""
    if _backend == "reference":
        return False
    if not HAS_EXTENSION:
        _warn_reference_once()
    return HAS_EXTENSION


def _warn_reference_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "switch_sae: the compiled extension is not available, running the slow plain "
            f"PyTorch reference ops instead. {REBUILD_HINT}",
            stacklevel=4,
        )


def with_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels."""
    return HAS_EXTENSION and bool(torch.ops.switch_sae.with_cuda())


def cpu_encoder_gemm() -> str:
    """The GEMM that ``encode_topk``'s CPU kernel runs for float32 on this CPU: ``"avx512"``
    (the extension's own, which reads each expert's weights in place), ``"aten"`` (torch's
    BLAS) or ``"reference"`` (no extension loaded)."""
    if not HAS_EXTENSION:
        return "reference"
    return importlib.import_module("switch_sae._C").cpu_encoder_gemm()


# ---------------------------------------------------------------- fake kernels and autograd


def check_one_device(**tensors: Tensor | None) -> None:
    """Raise, naming the stray argument, unless every given tensor is on the first one's device.

    The fake kernels below also serve the ``Meta`` dispatch key, which the dispatcher
    picks as soon as *any* argument is on ``meta``: without this check a call with only
    ``W_dec`` on meta would return uninitialised CPU memory instead of an error.
    """
    named = [(name, t) for name, t in tensors.items() if t is not None]
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t.device != ref.device:
            raise RuntimeError(
                f"switch_sae: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "they must be on the same device"
            )


def check_routing_sizes(n_active: int, n_experts: int, k: int | None = None, d_expert: int | None = None):
    """The integer arguments that set output shapes, bounded as the compiled kernels bound them."""
    if not 1 <= n_active <= n_experts:
        raise RuntimeError(
            f"switch_sae: n_active = {n_active} must be in [1, n_experts = W_enc.size(0) = {n_experts}]: "
            "each token goes to n_active distinct experts"
        )
    if k is not None and not 1 <= k <= d_expert:
        raise RuntimeError(f"switch_sae: k = {k} must be in [1, d_expert = W_enc.size(1) = {d_expert}]")


if HAS_EXTENSION:

    @torch.library.register_fake("switch_sae::dispatch")
    def _dispatch_fake(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
        if not 1 <= n_experts < 2**31:
            raise RuntimeError(f"switch_sae: n_experts = {n_experts} must be in [1, 2^31 - 1]")
        return experts.new_empty(experts.shape[0]), experts.new_empty(n_experts + 1)

    @torch.library.register_fake("switch_sae::encode_topk")
    def _encode_topk_fake(x, W_enc, b_enc, b_dec, order, offsets, n_active, k, tile_rows):
        check_one_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, order=order, offsets=offsets)
        check_routing_sizes(n_active, W_enc.shape[0], k, W_enc.shape[1])
        rows = x.shape[0] * n_active
        return x.new_empty(rows, k), order.new_empty(rows, k)

    @torch.library.register_fake("switch_sae::encode_backward")
    def _encode_backward_fake(grad_values, values, indices, x, W_enc, b_dec, n_active):
        check_one_device(values=values, grad_values=grad_values, indices=indices, x=x, W_enc=W_enc, b_dec=b_dec)
        check_routing_sizes(n_active, W_enc.shape[0])
        return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[:2])

    @torch.library.register_fake("switch_sae::decode")
    def _decode_fake(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        check_one_device(values=values, indices=indices, W_dec=W_dec)
        return values.new_empty(values.shape[0], W_dec.shape[1])

    @torch.library.register_fake("switch_sae::decode_backward")
    def _decode_backward_fake(grad_out, values, indices, W_dec):
        check_one_device(values=values, grad_out=grad_out, indices=indices, W_dec=W_dec)
        return torch.empty_like(values), torch.empty_like(W_dec)

    def _encode_topk_setup(ctx, inputs, output):
        x, W_enc, b_enc, b_dec, _order, _offsets, n_active, _k, _tile_rows = inputs
        values, indices = output
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.n_active = n_active
        ctx.has_b_enc = b_enc is not None

    def _encode_topk_backward(ctx, grad_values, _grad_indices):
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        grad_x, grad_W_enc, grad_b_enc = torch.ops.switch_sae.encode_backward(
            grad_values.contiguous(), values, indices, x, W_enc, b_dec, ctx.n_active
        )
        grad_b_dec = -grad_x.sum(0)  # pre = W (x - b_dec): d/d b_dec = -d/dx
        grad_b_enc = grad_b_enc if ctx.has_b_enc else None
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None, None

    torch.library.register_autograd(
        "switch_sae::encode_topk", _encode_topk_backward, setup_context=_encode_topk_setup
    )

    def _decode_setup(ctx, inputs, output):
        values, indices, W_dec = inputs
        ctx.save_for_backward(values, indices, W_dec)

    def _decode_backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values, grad_W_dec = torch.ops.switch_sae.decode_backward(
            grad_out.contiguous(), values, indices, W_dec
        )
        return grad_values, None, grad_W_dec

    torch.library.register_autograd(
        "switch_sae::decode", _decode_backward, setup_context=_decode_setup
    )


# ---------------------------------------------------------------- wrappers


def _wrapper(name: str, summary: str, *, autocast_off: bool) -> Callable[..., Any]:
    """``ops.<name>``: ``torch.ops.switch_sae.<name>`` while the compiled ops are in use, else
    ``reference.<name>``, with the twin's signature and ``summary`` as its docstring.

    ``autocast_off``: the compiled op is not autocast-aware (it runs in its inputs' dtype), so
    its twin must run with autocast off too rather than let autocast lower some of its products.
    """

    def op(*args: Any) -> Any:
        if _compiled():
            return getattr(torch.ops.switch_sae, name)(*args)
        twin = getattr(reference, name)  # looked up per call, so a patched twin is the one used
        if not autocast_off:
            return twin(*args)
        with torch.autocast(args[0].device.type, enabled=False):
            return twin(*args)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"{summary} See ``reference.{name}``."
    op.__signature__ = inspect.signature(getattr(reference, name))  # type: ignore[attr-defined]
    return op


dispatch = _wrapper("dispatch", "Group (token, expert) pairs by expert.", autocast_off=False)
encode_topk = _wrapper("encode_topk", "Routed encoder, TopK(k), ReLU, in tiles.", autocast_off=True)
decode = _wrapper("decode", "Sparse gather-sum decoder.", autocast_off=True)
decode_backward = _wrapper("decode_backward", "Gradients of ``decode``.", autocast_off=False)
encode_backward = _wrapper("encode_backward", "Gradients of ``encode_topk``.", autocast_off=False)
