"""Run a TransformerLens model with one of our SAEs spliced in at its hook.

Works with a ``HookedTransformer`` (TransformerLens 2/3) and a ``TransformerBridge``
(TransformerLens 3.4+/4): both have ``hook_dict`` and the ``hooks(fwd_hooks=...)`` context manager.

The equivalent of SAELens's ``HookedSAETransformer.add_sae``: inside ``with splice_sae(model,
sae):`` every forward pass replaces the activation at ``sae.cfg.hook_name`` by the SAE's
reconstruction. With ``use_error_term=True`` the SAE's error ``x - x_hat`` (computed with the
SAE's own hooks disabled) is added back, so the model's output is unchanged until someone
intervenes through the SAE's hooks (``hook_sae_acts_post`` etc.): then only the intervention's
effect flows downstream, which makes feature interventions exact.

It is a forward hook on the model's hook point rather than a module swap, so the SAE's internal
activations are not in ``run_with_cache``'s cache (hook the SAE itself to read them).

What it leaves out: several SAEs at one hook, and attention-head (``hook_z``) reshaping.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..models.base import SAE


@contextmanager
def _sae_hooks_disabled(sae: SAE) -> Iterator[None]:
    """Temporarily detach every forward hook from the SAE's hook points."""
    saved = {}
    for name, module in sae.named_modules():
        if module._forward_hooks:
            saved[name] = dict(module._forward_hooks)
            module._forward_hooks.clear()
    try:
        yield
    finally:
        modules = dict(sae.named_modules())
        for name, hooks in saved.items():
            modules[name]._forward_hooks.update(hooks)


def spliced_activation(sae: SAE, x: Tensor, use_error_term: bool = False) -> Tensor:
    """What the model sees at the hook: ``x_hat`` (``[..., d_in]``), plus the error if asked."""
    out = sae(x).x_hat
    if use_error_term:
        with torch.no_grad(), _sae_hooks_disabled(sae):
            error = x - sae(x).x_hat.to(x.dtype)
        out = out.to(x.dtype) + error
    return out.to(x.dtype)


@contextmanager
def splice_sae(model: Any, sae: SAE, *, hook_name: str | None = None, use_error_term: bool = False) -> Iterator[Any]:
    """Context manager: ``model``'s forward passes read ``sae``'s reconstruction at its hook.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (anything with ``hook_dict`` and ``hooks``).
        sae: one of our SAEs, with ``d_in`` equal to the activation width at the hook.
        hook_name: defaults to ``sae.cfg.hook_name``.
        use_error_term: add back ``x - x_hat`` so the output is unchanged unless the SAE's hooks
            intervene.
    """
    name = hook_name or getattr(sae.cfg, "hook_name", "")
    if not name:
        raise ValueError("hook_name is empty: set sae.cfg.hook_name or pass hook_name")
    if name not in model.hook_dict:
        raise ValueError(f"hook_name={name!r} is not a hook of this model (e.g. {next(iter(model.hook_dict))!r})")

    def replace(activation: Tensor, hook: Any) -> Tensor:
        if activation.shape[-1] != sae.d_in:
            raise ValueError(f"activation at {name} has width {activation.shape[-1]}, the SAE's d_in is {sae.d_in}")
        return spliced_activation(sae, activation, use_error_term)

    with model.hooks(fwd_hooks=[(name, replace)]):
        yield model


def run_with_sae(model: Any, sae: SAE, *args: Any, use_error_term: bool = False, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with ``sae`` spliced in (see ``splice_sae``)."""
    with splice_sae(model, sae, use_error_term=use_error_term):
        return model(*args, **kwargs)
