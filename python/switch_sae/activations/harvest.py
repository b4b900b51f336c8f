"""Activations of a TransformerLens model at one or more hook points.

``harvest(model, tokens, hook_names)`` runs ``model.run_with_cache`` under ``no_grad`` with
``names_filter`` set to exactly the hooks asked for and ``stop_at_layer`` set just past the
deepest block they live in (TransformerLens's ``stop_at_layer`` is exclusive), so a layer-8
hook of a 30-layer model costs 9 blocks and caches one tensor per hook. Several hooks share
one pass. Per-head hooks (``attn.hook_z`` / ``hook_q`` / ``hook_k`` / ``hook_v``,
``[batch, pos, n_heads, d_head]``) are flattened over heads to ``d_in = n_heads * d_head``.

Works with any model exposing TransformerLens's ``run_with_cache`` (a ``HookedTransformer``
of TransformerLens 2/3, or a ``TransformerBridge`` of TransformerLens 3.4+/4).

What it leaves out: where the tokens come from (``text``), shuffling (``buffer``) and disk
storage (``cache``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """Block index of ``hook_name`` (``blocks.8.hook_resid_post`` -> 8), None outside blocks."""
    match = _BLOCK.search(hook_name)
    return int(match.group(1)) if match else None


def stop_layer(hook_names: Sequence[str]) -> int | None:
    """``stop_at_layer`` that still computes every hook: one past the deepest block, or None
    (the full model) when a hook lies outside the blocks (e.g. ``ln_final.hook_normalized``)."""
    layers = [hook_layer(name) for name in hook_names]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]


def _as_hook_names(hook_names: str | Sequence[str]) -> list[str]:
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"hook_names must be a hook name or a non-empty list of them, got {hook_names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"hook_names has duplicates: {names}")
    return names


def check_hook_names(model: Any, hook_names: str | Sequence[str]) -> list[str]:
    """Validate hook names (a list without duplicates, each a hook point of ``model``)."""
    names = _as_hook_names(hook_names)
    known = getattr(model, "hook_dict", None)
    unknown = [n for n in names if known is not None and n not in known]
    if unknown:
        raise ValueError(f"hook_names {unknown} are not hook points of this model; see model.hook_dict")
    return names


def check_tokens(tokens: Any) -> Tensor:
    """Validate ``tokens [batch, pos]`` of integer ids."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an int64 tensor [batch, pos], got {tokens.dtype} {tuple(tokens.shape)}")
    return tokens.long()


def flatten_heads(act: Tensor) -> Tensor:
    """``[batch, pos, n_heads, d_head]`` -> ``[batch, pos, n_heads * d_head]``; others unchanged."""
    return act.flatten(2) if act.dim() == 4 else act


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def harvest(
    model: Any,
    tokens: Tensor,
    hook_names: str | Sequence[str],
    *,
    drop_first: bool = False,
    flatten: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Activations of ``tokens [batch, pos]`` at each hook, in one early-stopped pass.

    Returns ``{hook: [batch * pos', d_in]}`` (or ``[batch, pos', d_in]`` with ``flatten=False``)
    where ``pos' = pos - 1`` with ``drop_first`` (the BOS / first position, whose norm
    dwarfs the rest and which SAEs usually skip) and ``pos`` otherwise.
    """
    names = check_hook_names(model, hook_names)
    tokens = check_tokens(tokens).to(model_device(model))
    _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop_layer(names))
    out = {}
    for name in names:
        if name not in cache:
            raise ValueError(f"hook {name!r} did not fire; is it a hook name of this model (model.hook_dict)?")
        act = flatten_heads(cache[name])  # [batch, pos, d_in]
        if drop_first:
            act = act[:, 1:]
        if dtype is not None:
            act = act.to(dtype)
        out[name] = act.reshape(-1, act.shape[-1]) if flatten else act
    return out


def iter_activations(
    model: Any,
    token_batches: Iterable[Tensor],
    hook_names: str | Sequence[str],
    *,
    drop_first: bool = False,
    dtype: torch.dtype | None = None,
    total_tokens: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """``(tokens, harvest(model, tokens, ...))`` for each ``[batch, pos]`` of ``token_batches``,
    with a tokens/s progress bar."""
    names = _as_hook_names(hook_names)
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="harvest", disable=not progress) as bar:
        for tokens in token_batches:
            acts = harvest(model, tokens, names, drop_first=drop_first, dtype=dtype)
            bar.update(tokens.numel())
            yield tokens, acts


def hook_d_in(model: Any, hook_name: str, *, context_size: int = 4) -> int:
    """Width of ``hook_name``'s activations (after flattening heads), from a tiny forward pass."""
    tokens = torch.zeros(1, context_size, dtype=torch.long)
    return harvest(model, tokens, hook_name)[hook_name].shape[-1]
