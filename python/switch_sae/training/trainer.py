"""``Trainer``: the paper's recipe for any ``SAE``, one testable ``step()`` at a time.

    trainer = Trainer(model, TrainConfig(total_steps=10_000, run_dir="runs/a"))
    trainer.fit(batches)            # any iterable of [batch, d_in] tensors
    trainer.save_model("runs/a/sae")

One step: (first step only) estimate the input scale, fix the dead-latent window and put
``b_dec``/``b_router`` at the geometric median of the batch; set the scheduled lr; forward;
loss = the sum of ``model.training_terms`` (the architecture's own weighted terms: MSE,
load balancing, AuxK, L1, L0, ...; the trainer knows none by name); backward; drop the
decoder-gradient component parallel to each feature; clip; step the optimiser (``optim.py``,
Adam by default); renormalise the decoder rows; update the dead-latent counters; log.

Units: the model trains on ``input_scale * x`` (``E||x||^2 = d_in`` by default). When
``fit`` returns, the scale is folded into the model's parameters, so the model in memory,
like every saved copy, takes raw activations; a later ``step`` unfolds it again.

Mixed precision: with ``autocast="bfloat16"`` the forward pass and the losses run under
``torch.autocast``, master weights and the optimiser state stay in the parameter dtype and no GradScaler
is needed (bfloat16 has float32's range). Autocast lowers the dense matrix products (the
router, the L1-family encoders/decoders, the reference ops when the extension is absent);
the compiled ``switch_sae`` ops are not registered for autocast, so they run in the
parameter dtype: create the model with ``dtype="bfloat16"`` to run them in bfloat16.
Losses are always reduced in float32.

Across processes (``cfg.parallel``, ``switch_sae.parallel``): each process passes its slice
of every global batch to ``step``; the strategy makes the losses shares of the global ones,
sums gradients, and reduces the dead-latent counters and the metrics, so the run equals a
one-process run on the same global batches. Only rank 0 logs and shows progress.

Resuming: the trainer restores model, optimiser, lr position, counters, dead-latent counters
and torch's RNG, and ``fit`` skips the batches already consumed, so on CPU the losses after
a resume equal those of an uninterrupted run exactly (given the same batch iterable).

What it leaves out: the losses (each model's ``training_terms``), the checkpoint format
(``checkpoint.py``) and data loading (any iterable will do).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models import losses
from ..models.base import SAE
from ..utils.runs import config_clashes
from ..utils.typed_config import config_from_dict
from .. import parallel
from .checkpoint import CheckpointError, load_checkpoint, newest_valid, read_state
from .config import TrainConfig
from .dead import DeadLatentTracker, fired_latents, l0
from .init import init_biases_from_batch_
from .metrics import MetricsLogger, StepMetrics
from .optim import make_optimizer
from .normalization import estimate_scale, fold_input_scale_

# TrainConfig fields that may change between a run and its resumption.
_RESUMABLE = {
    "resume", "progress", "checkpoint_every", "keep_checkpoints", "log_every", "wandb_project", "tensorboard", "run_dir",
    "parallel_timeout_s",
}


class Trainer:
    """Trains one SAE with ``step(batch)``; ``fit(batches)`` loops, logs and checkpoints."""

    def __init__(self, model: SAE, cfg: TrainConfig) -> None:
        if not isinstance(model, SAE):
            raise TypeError(f"model must be a switch_sae SAE, got {type(model).__name__}")
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.model, self.cfg = model, cfg
        self.device = model.W_dec_flat.device
        torch.manual_seed(cfg.seed)
        # Before the optimiser: expert parallelism swaps in this process's expert slices.
        self.parallel = parallel.start(cfg.parallel, model, cfg.parallel_timeout_s)
        self.optimizer = make_optimizer(model.parameters(), cfg, lr=cfg.peak_lr(model.encoder_width))
        # The window is fixed on the first step, when the batch size is known.
        self.dead = DeadLatentTracker(model.d_sae, cfg.dead_after_tokens or 0, self.device)
        self.step_count = 0  # optimiser steps done
        self.tokens = 0  # tokens trained on
        self.batches_seen = 0  # position in the batch iterable, for resuming
        self.input_scale = 1.0  # x is multiplied by this before the model sees it
        self.scale_folded = False  # the model's parameters currently take raw x (after fit)
        self.initialised = False  # data-dependent init done
        main = self.parallel.is_main  # only rank 0 writes metrics and prints
        self.logger = MetricsLogger(cfg.run_dir if main else None, cfg.wandb_project if main else None,
                                    cfg.tensorboard and main, dataclasses.asdict(cfg))
        self._stop_requested = False
        if cfg.resume:
            self._resume()

    # -- one step ----------------------------------------------------------------
    def step(self, batch: Tensor) -> StepMetrics:
        """One optimiser step on ``batch [..., d_in]``; returns what it measured.

        Training across processes, ``batch`` is this process's slice of the global batch
        (any size, empty included) and every process calls ``step`` together.
        """
        cfg, model = self.cfg, self.model
        if self.step_count >= cfg.total_steps:
            raise RuntimeError(f"training is finished: all total_steps={cfg.total_steps} steps are done")
        start = time.perf_counter()
        x, _ = model.check_input(batch)  # [batch, d_in] in the model dtype
        n_tokens = self.parallel.n_tokens(x.shape[0])  # of the global batch
        if not self.initialised:
            self._initialise(self.parallel.whole_batch(x))
        self._to_training_units()
        if self.input_scale != 1.0:
            x = x * self.input_scale
        lr = cfg.lr_at(self.step_count, model.encoder_width)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with self._autocast(), self.parallel.scope(n_tokens):
            out = model(x)
            terms = model.training_terms(x, out, self.dead.dead())
        loss = sum(terms.values())  # a Python sum: the terms may differ in dtype (this process's share)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.step_count} (terms: "
                f"{ {k: v.item() for k, v in terms.items()} }); lower the lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.reduce_gradients(model)
        model.remove_decoder_parallel_grad_()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm_(model, max_norm)
        self.optimizer.step()
        model.normalize_decoder_()
        self.dead.update_(self.parallel.fired(fired_latents(out, model.d_sae)), n_tokens)
        self.step_count += 1
        self.tokens += n_tokens
        self.batches_seen += 1
        with self.parallel.scope(n_tokens):
            metrics = self._metrics(x, n_tokens, out, terms, loss, lr, grad_norm, time.perf_counter() - start)
        if self.step_count % cfg.log_every == 0 or self.step_count == cfg.total_steps:
            self.logger.log(metrics)
        return metrics

    def _initialise(self, x: Tensor) -> None:
        if self.cfg.normalize_inputs:
            self.input_scale = estimate_scale(x)
        self.dead.dead_after_tokens = self.cfg.resolved_dead_after_tokens(x.shape[0])
        if self.cfg.init_geometric_median:
            init_biases_from_batch_(self.model, x * self.input_scale)
        self.initialised = True

    def to_raw_units(self) -> None:
        """Fold the input scale into the model now, so that it takes raw activations (``fit``
        does this when it returns; the next ``step`` undoes it)."""
        if self.input_scale != 1.0 and not self.scale_folded:
            fold_input_scale_(self.model, self.input_scale)
            self.scale_folded = True

    def _to_training_units(self) -> None:
        """Back to training units, for another step after ``fit`` returned."""
        if self.scale_folded:
            fold_input_scale_(self.model, 1.0 / self.input_scale)
            self.scale_folded = False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def _metrics(self, x, n_tokens, out, terms, loss, lr, grad_norm, seconds) -> StepMetrics:
        # Each of these is this process's share of a batch average; summed, the batch's value.
        shares = {"loss": loss, "mse": terms["mse"], "fvu": terms["mse"] / losses.total_variance(x).clamp_min(1e-30),
                  "l0": l0(out), **{f"term.{name}": t for name, t in terms.items()}}
        if out.router_probs is not None:
            probs, experts = out.router_probs, out.experts
            shares |= {"lb": losses.load_balancing(probs, experts), "router_entropy": losses.router_entropy(probs),
                       "p_max": losses.router_p_max(probs)}
        values = self.parallel.shares(shares)
        metrics = StepMetrics(
            step=self.step_count,
            loss=values["loss"],
            mse=values["mse"],
            fvu=values["fvu"],
            l0=values["l0"],
            n_dead=int(self.dead.dead().sum()),
            lr=lr,
            grad_norm=float(grad_norm),
            tokens=self.tokens,
            tokens_per_s=n_tokens / max(seconds, 1e-9),
            parts={name: values[f"term.{name}"] for name in terms if name != "mse"},
            extra={name: t.item() for name, t in (out.aux or {}).items() if t.dim() == 0},
        )
        if out.router_probs is not None:
            metrics.lb, metrics.router_entropy, metrics.p_max = values["lb"], values["router_entropy"], values["p_max"]
            metrics.expert_load = losses.expert_load(experts, probs.shape[-1]).tolist()
        return metrics

    # -- the loop ----------------------------------------------------------------
    def fit(self, batches: Iterable[Tensor]) -> StepMetrics | None:
        """Train until ``total_steps`` or until ``batches`` runs out; returns the last metrics.

        When resuming, ``batches`` must yield the same sequence as the interrupted run: the
        batches it already consumed are skipped. Ctrl-C finishes the current step, writes a
        checkpoint (if ``run_dir`` is set) and raises ``KeyboardInterrupt``; a second Ctrl-C
        interrupts at once.
        """
        cfg = self.cfg
        iterator = iter(batches)
        for position in range(self.batches_seen):
            if next(iterator, None) is None:
                raise ValueError(f"batches ended at {position} but the run had consumed {self.batches_seen}")
        bar = tqdm(total=cfg.total_steps, initial=self.step_count, disable=not (cfg.progress and self.parallel.is_main),
                   desc="train")
        last = None
        try:
            with self._graceful_interrupt():
                while self.step_count < cfg.total_steps:
                    batch = next(iterator, None)
                    if batch is None:
                        break
                    last = self.step(batch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last.loss:.4g}", l0=f"{last.l0:.1f}", dead=last.n_dead)
                    if self.parallel.any_process(self._stop_requested):  # all stop at the same step
                        raise KeyboardInterrupt
                    if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
        except KeyboardInterrupt:
            if cfg.run_dir is not None:
                path = self.save_checkpoint()
                if self.parallel.is_main:
                    bar.write(f"interrupted at step {self.step_count}; checkpoint written to {path}")
            raise
        finally:
            bar.close()
        if cfg.run_dir is not None:
            if not (cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0):
                self.save_checkpoint()  # unless the loop just wrote this very step
        self.to_raw_units()
        if cfg.run_dir is not None:
            self.save_model(Path(cfg.run_dir) / "sae")
        self.logger.close()
        return last

    @contextlib.contextmanager
    def _graceful_interrupt(self):
        """First SIGINT: finish the step, then stop. Only in the main thread (signal's rule)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._stop_requested = False
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self._stop_requested = True
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C acts at once

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- persistence -------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        if self.cfg.run_dir is None:
            raise ValueError("this trainer has no run_dir, so it has nowhere to keep checkpoints")
        return Path(self.cfg.run_dir) / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state under ``run_dir/checkpoints``."""
        state = {
            "step": self.step_count,
            "tokens": self.tokens,
            "batches_seen": self.batches_seen,
            "input_scale": self.input_scale,
            "scale_folded": self.scale_folded,
            "dead_after_tokens": self.dead.dead_after_tokens,
            "initialised": self.initialised,
            "world_size": self.parallel.world,
            "train_config": dataclasses.asdict(self.cfg),
        }
        tensors = {"dead.tokens_since_fired": self.dead.tokens_since_fired}
        return self.parallel.save_checkpoint(
            self.checkpoint_root, self.step_count, self.model, self.optimizer, tensors, state, self.cfg.keep_checkpoints
        )

    def _resume(self) -> None:
        path = newest_valid(self.checkpoint_root)
        if path is None:
            return  # nothing to resume: a fresh run
        folder = self.parallel.checkpoint_folder(path)  # this process's files
        state = read_state(folder)
        saved = config_from_dict(TrainConfig, state["train_config"], folder / "trainer.json")
        if diff := config_clashes(saved, self.cfg, ignore=_RESUMABLE):
            raise CheckpointError(f"checkpoint {path} was trained with another TrainConfig; (saved, current): {diff}")
        if state.get("world_size", 1) != self.parallel.world:
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {state.get('world_size', 1)} processes, and "
                f"{self.parallel.world} are resuming it; resume with the same number (each process's data "
                "share and position depend on it)"
            )
        tensors, _ = load_checkpoint(folder, self.model, self.optimizer, verified=True)
        self.dead.tokens_since_fired.copy_(tensors["dead.tokens_since_fired"])
        self.step_count, self.tokens = state["step"], state["tokens"]
        self.batches_seen, self.input_scale = state["batches_seen"], state["input_scale"]
        self.scale_folded, self.dead.dead_after_tokens = state["scale_folded"], state["dead_after_tokens"]
        self.initialised = state["initialised"]
        self.logger.truncate_after(self.step_count)

    def save_model(self, directory: str | Path) -> Path:
        """Save the SAE for inference on raw inputs: the input scale is folded into a copy."""
        model = self.model
        if self.input_scale != 1.0 and not self.scale_folded:
            model = fold_input_scale_(copy.deepcopy(model), self.input_scale)
        return self.parallel.save_model(model, Path(directory))
