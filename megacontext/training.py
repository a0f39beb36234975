"""The training loop shared by LensNet and GistNet (DESIGN.md §5): AdamW, linear warmup then
cosine, clipping, periodic validation, atomic checkpoints (periodic, latest and best) with exact
resume, a JSONL log with namespaced keys and a progress bar.

Everything that decides the trajectory is either derived from (seed, step) or saved in the
checkpoint: model, optimiser and scheduler states and the torch RNG (dropout). Resuming from any
checkpoint therefore gives the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from megacontext.tree import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not a training checkpoint."""


@dataclass(frozen=True)
class LoopConfig:
    """The optimisation schedule every trained part shares (LensNet's seed values as defaults)."""

    lr: float = 1e-4
    """AdamW peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 16
    """Examples per step."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    warmup_steps: int = 1000
    """Linear warmup steps."""
    total_steps: int = 20000
    """Steps in all (cosine decays to 0 at the end)."""
    eval_every: int = 500
    """Evaluate on the validation data every this many steps."""
    ckpt_every: int = 2000
    """Keep a numbered checkpoint every this many steps (latest and best are kept always)."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train ('auto': CUDA when present)."""
    select: str = "loss"
    """The validation metric that picks best.pt: 'loss' (lower is better) or the name of a metric
    the validation reports where higher is better (e.g. 'ranking_accuracy': when the validation
    labels are on another scale than the training labels, their loss says little)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        for name in ("batch_size", "total_steps", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ConfigError("warmup_steps must be >= 0 and grad_clip > 0")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' = CUDA when present, else CPU; asking for CUDA without one is a ``ConfigError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is available")
    return torch.device(device)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint; ``CheckpointError`` names the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {err})"
        ) from err
    required = ("model", "model_config", "step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(f"{path}: not a training checkpoint (needs keys {required})")
    return ckpt


class TrainLoop:
    """The training loop shared by LensNet and GistNet: AdamW, warmup + cosine, clipping, periodic
    validation, atomic checkpoints (latest, best, numbered) with exact resume, JSONL log, tqdm.

    A subclass gives ``batch(step)`` (derived from ``(seed, step)`` so resume needs no data state),
    ``loss(batch) -> (loss, {name: float})`` and ``validate() -> {"val/loss": ..., ...}`` (or {}).
    Only parameters with ``requires_grad`` reach the optimiser (a frozen LM inside stays frozen).
    Under data parallelism (``rank``/``world_size`` from the subclass) only rank 0 validates and
    writes checkpoints and the log; the others train.
    """

    desc = "train"

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: dict,
        config: LoopConfig,
        out_dir: str | Path,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config, self.model_config_dict = config, model_config
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.out = Path(out_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.is_main
        self.device = next(model.parameters()).device
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters")
        groups = [g for g in self.param_groups(named) if g["params"]]
        self.opt = torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, config.warmup_steps, config.total_steps)
        )
        self.step = 0
        self.best = math.inf

    # ------------------------------------------------------------------------ to override
    def param_groups(self, named: list[tuple[str, torch.nn.Parameter]]) -> list[dict]:
        """AdamW parameter groups from the trainable (name, parameter) pairs; one group by default
        (a subclass may give some parameters their own learning rate)."""
        return [{"params": [p for _, p in named]}]

    def batch(self, step: int):
        raise NotImplementedError

    def loss(self, batch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self) -> dict:
        return {}

    def extra_state(self) -> dict:
        return {}

    # ------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "best": self.best,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "model_config": self.model_config_dict,
            "train_config": asdict(self.config),
            **self.extra_state(),
        }

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` (rank 0 only; other ranks return the path unwritten)."""
        path = self.out / name
        if self.is_main:
            atomic_save(self.state(), path)
        return path

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path, self.device)
        if ckpt["model_config"] != self.model_config_dict:
            raise CheckpointError(f"{path}: model config differs from this run's")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path}: state does not fit this model ({err})") from err
        self.step, self.best = ckpt["step"], ckpt["best"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [s.cpu() for s in ckpt["cuda_rng"]]
            )  # map_location moved them

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------ loop
    def train(self, until: int | None = None) -> dict:
        """Run to ``until`` (default ``total_steps``); returns the last validation metrics."""
        cfg = self.config
        until = cfg.total_steps if until is None else min(until, cfg.total_steps)
        self.model.train()
        last_eval: dict = {}
        bar = tqdm(
            total=until, initial=self.step, desc=self.desc, disable=not self.progress, leave=False
        )
        t0, n_steps = time.perf_counter(), 0
        while self.step < until:
            loss, terms = self.loss(self.batch(self.step))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in self.opt.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            n_steps += 1
            record = {
                "step": self.step,
                **terms,
                "opt/lr": self.sched.get_last_lr()[0],
                "opt/grad_norm": float(grad_norm),
            }
            if self.step % cfg.eval_every == 0 or self.step == until:
                elapsed = time.perf_counter() - t0
                record["perf/steps_per_s"] = n_steps / elapsed if elapsed > 0 else None
                record.update(self.perf(elapsed))
                t0, n_steps = time.perf_counter(), 0
                last_eval = self.validate() if self.is_main else {}
                self.model.train()
                record.update(last_eval)
                if last_eval and f"val/{cfg.select}" not in last_eval:
                    raise ConfigError(
                        f"select={cfg.select!r}: the validation reports no such metric "
                        f"(choose from {sorted(k.removeprefix('val/') for k in last_eval)})"
                    )
                value = last_eval.get(f"val/{cfg.select}")
                if value is not None:
                    value = value if cfg.select == "loss" else -value  # lower is better
                    if value < self.best:
                        self.best = value
                        self.save("best.pt")
                self.save("latest.pt")
                bar.set_postfix(
                    loss=f"{loss.item():.4f}", val=f"{last_eval.get('val/loss', float('nan')):.4f}"
                )
            if self.step % cfg.ckpt_every == 0:
                self.save(f"step-{self.step:07d}.pt")
            self._log(record)
            bar.update(1)
        bar.close()
        return last_eval

    def perf(self, elapsed: float) -> dict:
        return {}
