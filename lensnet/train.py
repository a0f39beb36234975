"""LensNet training loop (DESIGN.md §5): AdamW, linear warmup then cosine, clipping, periodic eval
with every metric, atomic checkpoints (periodic, latest and best) and exact resume.

Everything that decides the trajectory is either derived from (seed, step) or saved in the
checkpoint: model, optimiser and scheduler states, the torch RNG (dropout), and the position in
the epoch's seeded permutation. Resuming from any checkpoint therefore gives the same parameters
as an uninterrupted run. Losses are logged per term under namespaced keys to ``metrics.jsonl``.
Validation holds out whole documents (``split_indices``): snapshots of one document are
near-duplicates, so a split by snapshot would select checkpoints on training data.

Data-parallel training (DistributedDataParallel; gloo on CPU, NCCL on GPU) runs under ``torchrun``:
every rank derives the same global batch from (seed, step) and takes its interleaved share
(``batch_size`` must divide by the number of ranks); gradients are averaged across ranks, so the
run follows one process on the whole batch up to how each loss term is normalised over its half
(means over entries and pairs are taken per rank). Rank 0 alone validates, writes checkpoints and
the log. Resume restores the data exactly; dropout RNG is rank 0's (the seed's presets for CPU
runs have no dropout).
Usage: ``python -m lensnet.train --traces DIR --out DIR`` (``--help`` lists every option), or
``torchrun --nproc-per-node 2 -m lensnet.train --traces DIR --out DIR``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from lensnet.data import AugmentConfig, TraceDataset, collate, to_device
from lensnet.losses import LensNetLoss
from lensnet.metrics import MetricAccumulator
from lensnet.model import LensNet, LensNetConfig
from sim.traces import TraceReader
from sim.tree import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not a LensNet checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule of LensNet (seed values as defaults)."""

    lr: float = 1e-4
    """AdamW peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 16
    """Snapshots per step."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    warmup_steps: int = 1000
    """Linear warmup steps."""
    total_steps: int = 20000
    """Steps in all (cosine decays to 0 at the end)."""
    eval_every: int = 500
    """Evaluate on the validation snapshots every this many steps."""
    ckpt_every: int = 2000
    """Keep a numbered checkpoint every this many steps (latest and best are kept always)."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train ('auto': CUDA when present)."""
    reg_balance: Literal["entries", "levels"] = "levels"
    """L_reg averaged over labelled entries (DESIGN's definition) or per tree level, then over levels (default: token entries outnumber gists ~3:1 and most gist labels are 0; balancing raised the synthetic study's held-out NGR from 0.04 to 0.14)."""
    match_lr_scale: float = 10.0
    """Learning-rate multiplier of the match parameters (names starting ``match_``: LensNet's bilinear
    entry x tail-gist forms and their read-outs). The score is a product of these factors, so from a
    small start they must grow by orders of magnitude, each step moving them by about ``lr`` (AdamW):
    a larger step there learns the match in far fewer steps."""
    loss_splits: int = 1
    """Average the loss over this many interleaved parts of each rank's batch, each part normalised on its own (the loss terms are means over entries and pairs, and data-parallel ranks take them per rank: one process with loss_splits = W follows W ranks step for step)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        for name in ("batch_size", "total_steps", "eval_every", "ckpt_every", "loss_splits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.match_lr_scale > 0 and math.isfinite(self.match_lr_scale)):
            raise ConfigError(f"match_lr_scale must be a positive number, got {self.match_lr_scale}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ConfigError("warmup_steps must be >= 0 and grad_clip > 0")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    return torch.device(device)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _atomic_save(obj: dict, path: Path) -> None:
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
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    required = ("model", "model_config", "step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(f"{path}: not a LensNet checkpoint (needs keys {required})")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LensNet:
    """A trained LensNet from a checkpoint, in eval mode, with its calibration (``score_scale``,
    1 when the checkpoint has none)."""
    ckpt = load_checkpoint(path, device)
    model = LensNet(LensNetConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    scale = float((ckpt.get("calibration") or {}).get("score_scale", 1.0))
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: calibration score_scale must be a positive number, got {scale}")
    model.score_scale = scale
    return model.eval()


def save_calibration(path: str | Path, calibration: dict) -> None:
    """Store ``calibration`` (at least ``score_scale``) in an existing checkpoint, atomically."""
    scale = calibration.get("score_scale")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"calibration needs a positive finite score_scale, got {scale!r}")
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = calibration
    _atomic_save(ckpt, Path(path))


@torch.no_grad()
def evaluate(model: LensNet, loss_fn: LensNetLoss, dataset: TraceDataset, batch_size: int,
             device: torch.device) -> dict[str, float | None]:
    """Mean loss terms (weighted by snapshots) and every metric over ``dataset``, in eval mode; the
    model is left in the mode the caller had it in."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    sums: dict[str, float] = {}
    n = 0
    for s in range(0, len(dataset), batch_size):
        batch = to_device(collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]), device)
        pred = model(batch)
        out = loss_fn(pred, batch)
        b = pred.shape[0]
        for k in ("L_reg", "L_rank", "L_budget", "L_illegal"):
            sums[k] = sums.get(k, 0.0) + out[k] * b
        sums["loss"] = sums.get("loss", 0.0) + out["loss"].item() * b
        n += b
        acc.update(pred.cpu(), {k: v.cpu() for k, v in batch.items()})
    model.train(was_training)
    res: dict[str, float | None] = {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
    res.update({f"val/{k}": v for k, v in acc.compute().items()})
    return res


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

    def __init__(self, model: torch.nn.Module, model_config: dict, config: TrainConfig, out_dir: str | Path,
                 progress: bool = True, rank: int = 0, world_size: int = 1) -> None:
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
        match = [p for n, p in named if n.startswith("match_")]
        groups = [{"params": [p for n, p in named if not n.startswith("match_")]}]
        if match:
            groups.append({"params": match, "lr": config.lr * config.match_lr_scale})
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                     eps=config.eps, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, config.warmup_steps, config.total_steps))
        self.step = 0
        self.best = math.inf

    # ------------------------------------------------------------------------ to override
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
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "step": self.step, "best": self.best,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "model_config": self.model_config_dict, "train_config": asdict(self.config), **self.extra_state(),
        }

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` (rank 0 only; other ranks return the path unwritten)."""
        path = self.out / name
        if self.is_main:
            _atomic_save(self.state(), path)
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
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng"]])  # map_location moved them

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
        bar = tqdm(total=until, initial=self.step, desc=self.desc, disable=not self.progress, leave=False)
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
            record = {"step": self.step, **terms, "opt/lr": self.sched.get_last_lr()[0], "opt/grad_norm": float(grad_norm)}
            if self.step % cfg.eval_every == 0 or self.step == until:
                elapsed = time.perf_counter() - t0
                record["perf/steps_per_s"] = n_steps / elapsed if elapsed > 0 else None
                record.update(self.perf(elapsed))
                t0, n_steps = time.perf_counter(), 0
                last_eval = self.validate() if self.is_main else {}
                self.model.train()
                record.update(last_eval)
                if last_eval.get("val/loss") is not None and last_eval["val/loss"] < self.best:
                    self.best = last_eval["val/loss"]
                    self.save("best.pt")
                self.save("latest.pt")
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{last_eval.get('val/loss', float('nan')):.4f}")
            if self.step % cfg.ckpt_every == 0:
                self.save(f"step-{self.step:07d}.pt")
            self._log(record)
            bar.update(1)
        bar.close()
        return last_eval

    def perf(self, elapsed: float) -> dict:
        return {}


class Trainer(TrainLoop):
    """Trains LensNet on ``train`` snapshots, evaluating on ``val``; writes to ``out_dir``.

    With ``distributed`` (an initialised ``torch.distributed`` process group, as ``torchrun`` and
    ``main`` set up) the model is wrapped in DistributedDataParallel and each rank trains on its
    share of every global batch."""

    desc = "train lensnet"

    def __init__(self, model_config: LensNetConfig, config: TrainConfig, train: TraceDataset,
                 val: TraceDataset | None, out_dir: str | Path, progress: bool = True,
                 distributed: bool = False) -> None:
        d = train.reader.d_model
        if d != model_config.d_model:
            raise ConfigError(
                f"trace {train.reader.path} has d_model={d} but the LensNet config expects "
                f"d_model={model_config.d_model}"
            )
        if len(train) == 0:
            raise ConfigError(f"trace {train.reader.path} has no training snapshots")
        rank, world = 0, 1
        device = resolve_device(config.device)
        if distributed:
            if not dist.is_initialized():
                raise ConfigError("distributed=True needs an initialised process group (run under torchrun)")
            rank, world = dist.get_rank(), dist.get_world_size()
        if config.batch_size % (world * config.loss_splits):
            raise ConfigError(f"batch_size ({config.batch_size}) must be a multiple of ranks ({world}) x loss_splits "
                              f"({config.loss_splits})")
        if distributed:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
                torch.cuda.set_device(device)
        self.model_config = model_config
        self.train_set, self.val_set = train, val
        torch.manual_seed(config.seed)
        model = LensNet(model_config).to(device)
        super().__init__(model, asdict(model_config), config, out_dir, progress, rank=rank, world_size=world)
        # DDP broadcasts rank 0's parameters (all ranks initialise alike anyway) and averages gradients.
        self.train_model: torch.nn.Module = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        self.loss_fn = LensNetLoss(max_level=model_config.max_level, reg_balance=config.reg_balance)
        self._entries = 0

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset positions of this rank's share of the global batch at ``step``: a seeded
        permutation per epoch, derived, not stored; rank r takes positions r, r + W, ... of it."""
        n, bs = len(self.train_set), self.config.batch_size
        per_epoch = max(1, n // bs)
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        self.train_set.epoch = epoch
        idx = perm[pos * bs : pos * bs + bs] if n >= bs else perm
        return idx[self.rank :: self.world_size]

    def batch(self, step: int) -> dict[str, Tensor]:
        """This rank's collated batch at ``step``."""
        return to_device(collate([self.train_set[int(i)] for i in self.batch_indices(step)]), self.device)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        pred = self.train_model(batch)  # (B, N): one forward; snapshots are scored independently
        k = self.config.loss_splits
        parts = [self.loss_fn(pred[j::k], {key: v[j::k] for key, v in batch.items()}) for j in range(k)]
        loss = sum(out["loss"] for out in parts) / k
        terms = [loss.item(), *(sum(out[t] for out in parts) / k for t in ("L_reg", "L_rank", "L_budget", "L_illegal"))]
        entries = float(batch["valid_mask"].sum())
        if self.world_size > 1:  # log the mean over ranks (entries: the sum)
            t = torch.tensor([*terms, entries], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            *terms, entries = (t / torch.tensor([self.world_size] * 5 + [1], device=self.device)).tolist()
        self._entries += int(entries)
        return loss, dict(zip(("loss/total", "loss/reg", "loss/rank", "loss/budget", "loss/illegal"), terms,
                                     strict=True))

    def validate(self) -> dict:
        if self.val_set is None or not len(self.val_set):
            return {}
        return evaluate(self.model, self.loss_fn, self.val_set, self.config.batch_size, self.device)

    def perf(self, elapsed: float) -> dict:
        entries, self._entries = self._entries, 0
        return {"perf/entries_per_s": entries / elapsed if elapsed > 0 else None}


def split_indices(doc_ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of snapshot indices by document: ``doc_ids`` (S,) is each snapshot's
    document; ``round(val_fraction x documents)`` whole documents (at least one when the fraction is
    positive) are validation, the rest training. Returns sorted (train, val) snapshot indices."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.ndim != 1:
        raise ValueError(f"doc_ids must be one document id per snapshot (1-D), got shape {doc_ids.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = np.unique(doc_ids)
    n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    if n_val >= len(docs) and n_val > 0:
        raise ConfigError(f"a validation split by document needs at least 2 documents; the traces hold "
                          f"{len(docs)} (give --val-traces, or --val-fraction 0)")
    val_docs = docs[np.random.default_rng([seed, 12345]).permutation(len(docs))[:n_val]]
    is_val = np.isin(doc_ids, val_docs)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


@dataclass
class TrainArgs:
    """Train LensNet on a trace directory."""

    traces: str = "runs/traces"
    """Trace directory written by the labeller (manifest.json + shards)."""
    val_traces: str | None = None
    """Separate validation traces (else a --val-fraction split of --traces)."""
    val_fraction: float = 0.1
    """Fraction of the documents in --traces held out (whole) for validation when --val-traces is unset."""
    out: str = "runs/lensnet"
    """Output directory: checkpoints and metrics.jsonl."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """Model size: tiny/small for CPU, seed = DESIGN §5 (d_lens 512)."""
    resume: str | None = None
    """Checkpoint to resume from (e.g. OUT/latest.pt)."""
    train: TrainConfig = field(default_factory=TrainConfig)


def model_config_for(preset: str, d_model: int, max_level: int, block_size: int) -> LensNetConfig:
    kw = {"max_level": max_level, "block_size": block_size}
    if preset == "tiny":
        return LensNetConfig.tiny(d_model, **kw)
    if preset == "small":
        return LensNetConfig.small(d_model, **kw)
    return LensNetConfig(d_model=d_model, **kw)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; under ``torchrun`` (WORLD_SIZE > 1) it trains data-parallel."""
    from sim.cli import parse

    args = parse(TrainArgs, argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if resolve_device(args.train.device).type == "cuda" else "gloo")
    try:
        reader = TraceReader(args.traces)
        if args.val_traces:
            val_reader = TraceReader(args.val_traces)
            train_idx, val = np.arange(len(reader)), TraceDataset(val_reader)
        else:
            train_idx, val_idx = split_indices(reader.snapshots["doc_id"], args.val_fraction, args.train.seed)
            val = TraceDataset(reader, val_idx)
        train = TraceDataset(reader, train_idx, augment=args.train.augment, seed=args.train.seed)
        meta = reader.meta
        mcfg = model_config_for(args.preset, reader.d_model, int(meta.get("max_level", 2)), int(meta.get("block_size", 32)))
        trainer = Trainer(mcfg, args.train, train, val, args.out, distributed=distributed)
        if args.resume:
            trainer.resume(args.resume)
        result = trainer.train()
        if trainer.is_main:
            print(json.dumps(result, indent=1))
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
