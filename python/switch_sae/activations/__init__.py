"""Activations for SAEs: text -> token contexts -> hook activations -> batches.

``pipeline`` is the whole path behind one ``DataConfig`` (what ``train``, ``eval``, the demo
and ``reproduce`` use); the steps it chains are: ``text`` makes fixed-length token contexts
from strings, files or HF datasets; ``harvest`` runs a TransformerLens model up to the hook
and returns the activations; ``cache`` stores them on disk for reuse; ``buffer`` shuffles
them into training batches. ``default_model`` provides a real model and text that work
offline; ``stored`` reads activations stored elsewhere (shards, SAELens datasets) for
training without a model; ``synthetic`` makes activations with known ground-truth features
for tests and small experiments, with no model at all.
"""

from .buffer import ShufflingBuffer
from .cache import ActivationCache, CacheSpec, CacheWriter, build_cache
from .default_model import (
    DEFAULT_HOOK,
    DEFAULT_MODEL_NAME,
    default_model_available,
    default_text_available,
    default_text_files,
    load_default_model,
    load_model,
)
from .harvest import harvest, hook_d_in, hook_layer, iter_activations, stop_layer
from .pipeline import DataConfig
from .stored import StoredActivations, open_activations
from .synthetic import SyntheticActivations, SyntheticBatch, SyntheticConfig, mean_max_cosine
from .text import batched, bos_settings, iter_contexts, iter_documents, load_tokens

__all__ = [
    "ActivationCache",
    "CacheSpec",
    "CacheWriter",
    "DataConfig",
    "DEFAULT_HOOK",
    "DEFAULT_MODEL_NAME",
    "ShufflingBuffer",
    "StoredActivations",
    "SyntheticActivations",
    "SyntheticBatch",
    "SyntheticConfig",
    "batched",
    "bos_settings",
    "build_cache",
    "default_model_available",
    "default_text_available",
    "default_text_files",
    "harvest",
    "hook_d_in",
    "hook_layer",
    "iter_activations",
    "iter_contexts",
    "iter_documents",
    "load_default_model",
    "load_model",
    "load_tokens",
    "mean_max_cosine",
    "open_activations",
    "stop_layer",
]
