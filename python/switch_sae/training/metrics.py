"""Per-step training metrics and where they go: JSONL, plus wandb/TensorBoard if installed.

What it leaves out: computing the numbers (``trainer.py``, ``models/losses.py``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write


@dataclass
class StepMetrics:
    """What one optimiser step measured. Loss parts are already weighted as in ``loss``."""

    step: int
    """Steps completed, this one included."""
    loss: float
    """Total loss that was minimised."""
    mse: float
    """Reconstruction error summed over d_in, mean over tokens (in normalised units if normalising)."""
    fvu: float
    """Fraction of the batch's variance left unexplained."""
    l0: float
    """Mean nonzero activations per token, from the code used to decode."""
    n_dead: int
    """Latents silent for more than dead_after_tokens tokens (after this step)."""
    lr: float
    """Learning rate of this step."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Tokens trained on so far."""
    tokens_per_s: float
    """Throughput of this step (wall clock)."""
    parts: dict[str, float] = field(default_factory=dict)
    """Weighted loss terms besides mse: lb, auxk, l1, l0, gate_aux."""
    lb: float | None = None
    """Unweighted load-balancing statistic n_experts * sum f_i P_i (1 = balanced); routed models."""
    expert_load: list[float] | None = None
    """Share of tokens per expert (f_i); routed models."""
    router_entropy: float | None = None
    """Mean per-token entropy of the router distribution (nats); routed models."""
    p_max: float | None = None
    """Mean over tokens of the largest router probability (1/n_experts: a flat router); routed models."""
    extra: dict[str, float] = field(default_factory=dict)
    """Architecture statistics from ForwardOutput.aux (e.g. BatchTopK's threshold)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class MetricsLogger:
    """Appends ``StepMetrics`` to ``<run_dir>/metrics.jsonl`` and to optional backends."""

    def __init__(self, run_dir: str | Path | None, wandb_project: str | None, tensorboard: bool, config: dict) -> None:
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self._wandb = self._tb = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("wandb_project is set but wandb is not installed (pip install wandb)") from err
            self._wandb = wandb.init(project=wandb_project, config=config, dir=run_dir)
        if tensorboard:
            if run_dir is None:
                raise ValueError("tensorboard logging needs run_dir")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("tensorboard=True but tensorboard is not installed (pip install tensorboard)") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (they will be re-run after resuming)."""
        if self.path is None or not self.path.is_file():
            return
        kept = [line for line, record in _read_records(self.path) if record["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def log(self, metrics: StepMetrics) -> None:
        record = metrics.as_dict()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        flat = _flatten(record)
        if self._wandb is not None:
            self._wandb.log(flat, step=metrics.step)
        if self._tb is not None:
            for name, value in flat.items():
                self._tb.add_scalar(name, value, metrics.step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs of a JSONL metrics file. A partial last line (a write cut short
    by a crash or a full disk) is dropped with a warning; damage elsewhere raises naming the line."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a metrics record with an integer 'step'")
        except ValueError as err:
            if number == len(lines):  # no newline after it: the write never finished
                warnings.warn(f"{path}: dropping the partial last line {number} ({err})", stacklevel=3)
                continue
            raise ValueError(f"{path}: line {number} is not a metrics record ({err}); fix or delete that line") from err
        records.append((line, record))
    return records


def _flatten(record: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{name}/{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            flat.update({f"{name}/{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat
