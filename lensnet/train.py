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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lensnet.data import AugmentConfig, TraceDataset, collate, to_device
from lensnet.losses import LensNetLoss, LossConfig
from lensnet.metrics import MetricAccumulator
from lensnet.model import LensNet, LensNetConfig
from megacontext.traces import TraceReader
from megacontext.training import (
    CheckpointError,
    LoopConfig,
    TrainLoop,
    atomic_save,
    load_checkpoint,
    resolve_device,
)
from megacontext.tree import ConfigError


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """LensNet's training: the shared schedule (``LoopConfig``, seed values as defaults), the loss
    and its weights, data parallelism and augmentation."""

    match_lr_scale: float = 10.0
    """Learning-rate multiplier of the match parameters (names starting ``match_``: LensNet's
    bilinear entry x tail-gist forms and their read-outs). The score is a product of these factors,
    so from a small start they must grow by orders of magnitude, each step moving them by about
    ``lr`` (AdamW): a larger step there learns the match in far fewer steps."""
    loss_splits: int = 1
    """Average the loss over this many interleaved parts of each rank's batch, each part normalised
    on its own (the loss terms are means over entries and pairs, and data-parallel ranks take them
    per rank: one process with loss_splits = W follows W ranks step for step)."""
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_splits < 1:
            raise ConfigError(f"loss_splits must be >= 1, got {self.loss_splits}")
        if not (self.match_lr_scale > 0 and math.isfinite(self.match_lr_scale)):
            raise ConfigError(
                f"match_lr_scale must be a positive number, got {self.match_lr_scale}"
            )


GATES = ("scale", "rank")
"""How a calibrated LensNet's scores meet the allocator's thresholds: 'scale' (raw x
``score_scale`` against ``tau_expand``) or 'rank' (its order on the heuristics' rank scale,
``sim.taskworld.features.rank_scores``), whichever realised more gain on the calibration tasks."""


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LensNet:
    """A trained LensNet from a checkpoint, in eval mode, with its calibration (``score_scale``,
    1 when the checkpoint has none; ``gate``, 'scale' when it has none)."""
    ckpt = load_checkpoint(path, device)
    model = LensNet(LensNetConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    scale = float((ckpt.get("calibration") or {}).get("score_scale", 1.0))
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(
            f"{path}: calibration score_scale must be a positive number, got {scale}"
        )
    model.score_scale = scale
    gate = (ckpt.get("calibration") or {}).get("gate", "scale")
    if gate not in GATES:
        raise CheckpointError(f"{path}: calibration gate must be one of {GATES}, got {gate!r}")
    model.score_gate = gate
    return model.eval()


def save_calibration(path: str | Path, calibration: dict) -> None:
    """Store ``calibration`` (at least ``score_scale``; ``gate`` optional) in an existing
    checkpoint, atomically."""
    scale = calibration.get("score_scale")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"calibration needs a positive finite score_scale, got {scale!r}")
    if calibration.get("gate", "scale") not in GATES:
        raise ValueError(f"calibration gate must be one of {GATES}, got {calibration['gate']!r}")
    ckpt = load_checkpoint(path)
    ckpt["calibration"] = calibration
    atomic_save(ckpt, Path(path))


@torch.no_grad()
def snapshot_metrics(
    model: LensNet,
    loss_fn: LensNetLoss,
    dataset: TraceDataset,
    batch_size: int,
    device: torch.device,
) -> dict[str, float | None]:
    """Mean loss terms (weighted by snapshots) and every metric over ``dataset``, in eval mode; the
    model is left in the mode the caller had it in."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    sums: dict[str, float] = {}
    n = 0
    for s in range(0, len(dataset), batch_size):
        batch = to_device(
            collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]), device
        )
        pred = model(batch)
        out = loss_fn(pred, batch)
        b = pred.shape[0]
        for k in loss_fn.TERMS:
            sums[k] = sums.get(k, 0.0) + out[k] * b
        sums["loss"] = sums.get("loss", 0.0) + out["loss"].item() * b
        n += b
        acc.update(pred.cpu(), {k: v.cpu() for k, v in batch.items()})
    model.train(was_training)
    res: dict[str, float | None] = {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
    res.update({f"val/{k}": v for k, v in acc.compute().items()})
    return res


class Trainer(TrainLoop):
    """Trains LensNet on ``train`` snapshots, evaluating on ``val``; writes to ``out_dir``.

    With ``distributed`` (an initialised ``torch.distributed`` process group, as ``torchrun`` and
    ``main`` set up) the model is wrapped in DistributedDataParallel and each rank trains on its
    share of every global batch."""

    desc = "train lensnet"

    def __init__(
        self,
        model_config: LensNetConfig,
        config: TrainConfig,
        train: TraceDataset,
        val: TraceDataset | None,
        out_dir: str | Path,
        progress: bool = True,
        distributed: bool = False,
    ) -> None:
        d = train.reader.d_model
        if d != model_config.d_model:
            raise ConfigError(
                f"trace {train.reader.path} has d_model={d} but the LensNet config expects "
                f"d_model={model_config.d_model}"
            )
        for ds in (train, val):
            served = ds.reader.n_entry_features if ds is not None and ds.entry_features else 0
            if ds is not None and served != model_config.n_entry_features:
                raise ConfigError(
                    f"trace {ds.reader.path} serves n_entry_features={served} "
                    f"but the LensNet config expects {model_config.n_entry_features}"
                )
        if len(train) == 0:
            raise ConfigError(f"trace {train.reader.path} has no training snapshots")
        rank, world = 0, 1
        device = resolve_device(config.device)
        if distributed:
            if not dist.is_initialized():
                raise ConfigError(
                    "distributed=True needs an initialised process group (run under torchrun)"
                )
            rank, world = dist.get_rank(), dist.get_world_size()
        if config.batch_size % (world * config.loss_splits):
            raise ConfigError(
                f"batch_size ({config.batch_size}) must be a multiple of ranks ({world}) x "
                "loss_splits "
                f"({config.loss_splits})"
            )
        if distributed:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
                torch.cuda.set_device(device)
        self.model_config = model_config
        self.train_set, self.val_set = train, val
        torch.manual_seed(config.seed)
        model = LensNet(model_config).to(device)
        super().__init__(
            model, asdict(model_config), config, out_dir, progress, rank=rank, world_size=world
        )
        # DDP broadcasts rank 0's parameters (all ranks initialise alike anyway) and averages
        # gradients.
        self.train_model: torch.nn.Module = (
            model
            if world == 1
            else torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        )
        self.loss_fn = LensNetLoss.from_config(config.loss, model_config.max_level)
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
        return to_device(
            collate([self.train_set[int(i)] for i in self.batch_indices(step)]), self.device
        )

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        pred = self.train_model(batch)  # (B, N): one forward; snapshots are scored independently
        k = self.config.loss_splits
        parts = [
            self.loss_fn(pred[j::k], {key: v[j::k] for key, v in batch.items()}) for j in range(k)
        ]
        loss = sum(out["loss"] for out in parts) / k
        names = self.loss_fn.TERMS
        terms = [loss.item(), *(sum(out[t] for out in parts) / k for t in names)]
        entries = float(batch["valid_mask"].sum())
        if self.world_size > 1:  # log the mean over ranks (entries: the sum)
            t = torch.tensor([*terms, entries], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            scale = torch.tensor([self.world_size] * len(terms) + [1], device=self.device)
            *terms, entries = (t / scale).tolist()
        self._entries += int(entries)
        keys = ["loss/total", *(f"loss/{t.removeprefix('L_').lower()}" for t in names)]
        return loss, dict(zip(keys, terms, strict=True))

    def param_groups(self, named: list[tuple[str, torch.nn.Parameter]]) -> list[dict]:
        """The match parameters (``match_*``) learn ``match_lr_scale`` times faster."""
        match = [p for n, p in named if n.startswith("match_")]
        rest = [p for n, p in named if not n.startswith("match_")]
        return [
            {"params": rest},
            {"params": match, "lr": self.config.lr * self.config.match_lr_scale},
        ]

    def validate(self) -> dict:
        if self.val_set is None or not len(self.val_set):
            return {}
        return snapshot_metrics(
            self.model, self.loss_fn, self.val_set, self.config.batch_size, self.device
        )

    def perf(self, elapsed: float) -> dict:
        entries, self._entries = self._entries, 0
        return {"perf/entries_per_s": entries / elapsed if elapsed > 0 else None}


def split_indices(
    doc_ids: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of snapshot indices by document: ``doc_ids`` (S,) is each snapshot's
    document; ``round(val_fraction x documents)`` whole documents (at least one when the fraction is
    positive) are validation, the rest training. Returns sorted (train, val) snapshot indices."""
    doc_ids = np.asarray(doc_ids)
    if doc_ids.ndim != 1:
        raise ValueError(
            f"doc_ids must be one document id per snapshot (1-D), got shape {doc_ids.shape}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = np.unique(doc_ids)
    n_val = max(1, int(round(len(docs) * val_fraction))) if val_fraction > 0 else 0
    if n_val >= len(docs) and n_val > 0:
        raise ConfigError(
            f"a validation split by document needs at least 2 documents; the traces hold "
            f"{len(docs)} (give --val-traces, or --val-fraction 0)"
        )
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
    """Fraction of the documents in --traces held out (whole) for validation when --val-traces is
    unset."""
    out: str = "runs/lensnet"
    """Output directory: checkpoints and metrics.jsonl."""
    preset: Literal["tiny", "small", "seed"] = "small"
    """Model size: tiny/small for CPU, seed = DESIGN §5 (d_lens 512)."""
    resume: str | None = None
    """Checkpoint to resume from (e.g. OUT/latest.pt)."""
    train: TrainConfig = field(default_factory=TrainConfig)


def model_config_for(
    preset: str,
    d_model: int,
    max_level: int,
    block_size: int,
    n_entry_features: int = 0,
    n_query_tokens: int = 0,
    feature_set: str = "attention",
    prior: str = "",
) -> LensNetConfig:
    kw = {
        "max_level": max_level,
        "block_size": block_size,
        "n_entry_features": n_entry_features,
        "n_query_tokens": n_query_tokens,
        "feature_set": feature_set,
        "prior": prior,
    }
    if preset == "tiny":
        return LensNetConfig.tiny(d_model, **kw)
    if preset == "small":
        return LensNetConfig.small(d_model, **kw)
    return LensNetConfig(d_model=d_model, **kw)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; under ``torchrun`` (WORLD_SIZE > 1) it trains data-parallel."""
    from megacontext.cli import parse

    args = parse(TrainArgs, argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(
            "nccl" if resolve_device(args.train.device).type == "cuda" else "gloo"
        )
    try:
        reader = TraceReader(args.traces)
        if args.val_traces:
            val_reader = TraceReader(args.val_traces)
            train_idx, val = np.arange(len(reader)), TraceDataset(val_reader)
        else:
            train_idx, val_idx = split_indices(
                reader.snapshots["doc_id"], args.val_fraction, args.train.seed
            )
            val = TraceDataset(reader, val_idx)
        train = TraceDataset(reader, train_idx, augment=args.train.augment, seed=args.train.seed)
        meta = reader.meta
        if args.val_traces and val_reader.meta.get("n_query_tokens", 0) != meta.get(
            "n_query_tokens", 0
        ):
            raise ConfigError(
                f"{args.val_traces}: n_query_tokens differs from {args.traces}'s "
                f"({val_reader.meta.get('n_query_tokens', 0)} vs {meta.get('n_query_tokens', 0)})"
            )
        mcfg = model_config_for(
            args.preset,
            reader.d_model,
            int(meta.get("max_level", 2)),
            int(meta.get("block_size", 32)),
            reader.n_entry_features,
            int(meta.get("n_query_tokens", 0)),
        )
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
