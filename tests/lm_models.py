"""Tiny TransformerLens language models with random weights, built from a config (nothing is
downloaded), of each kind the installed TransformerLens offers:

- ``hooked_transformer``: ``HookedTransformer(HookedTransformerConfig(...))``, the API of
  TransformerLens 2 and 3 (4 removed it);
- ``transformer_bridge``: ``TransformerBridge.boot_native(TransformerBridgeConfig(...))``
  (TransformerLens 3 and 4).

Both kinds have the shape below, so a test can use these constants whichever it gets. The
``tiny_lm`` fixture (conftest.py) is parametrised over ``MODEL_KINDS``: a test taking it runs
once per kind.

What it leaves out: pretrained models (``switch_sae.activations.load_default_model``).
"""

from __future__ import annotations

import warnings

import torch

N_LAYERS, D_MODEL, N_HEADS, D_HEAD, D_MLP, D_VOCAB, N_CTX = 3, 16, 4, 4, 32, 50, 16
_SHAPE = dict(
    n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, d_head=D_HEAD, d_mlp=D_MLP, d_vocab=D_VOCAB,
    n_ctx=N_CTX, act_fn="gelu", normalization_type="LN",
)


def has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TransformerLens 4 (or none installed)
        return False
    return True


MODEL_KINDS = (["hooked_transformer"] if has_hooked_transformer() else []) + ["transformer_bridge"]


def tiny_model(kind: str, seed: int = 0):
    """A tiny random model of ``kind`` (one of ``MODEL_KINDS``), in eval mode."""
    # Both constructors seed torch's global generator; fork it so building a model does not
    # change the random numbers of the test that asked for it.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "hooked_transformer":
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            with warnings.catch_warnings():  # TransformerLens 3 deprecates it for the bridge
                warnings.simplefilter("ignore", DeprecationWarning)
                model = HookedTransformer(HookedTransformerConfig(**_SHAPE, seed=seed))
        elif kind == "transformer_bridge":
            from transformer_lens.config import TransformerBridgeConfig
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(TransformerBridgeConfig(**_SHAPE, seed=seed))
        else:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    return model.eval()
