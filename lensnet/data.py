"""Trace datasets for LensNet: snapshots from ``sim.traces`` as padded, masked torch batches.

``TraceDataset`` serves one snapshot per index, with the seed's augmentations (DESIGN §5): temporal
jitter (keep every other entry, random phase, p = 0.3) and utility noise (Gaussian, std 0.05, on
labelled targets, p = 0.2). Each draw comes from a generator keyed by (seed, epoch, index), so an
augmentation never depends on the order or the process that asked for it: a resumed run sees the
same data as an uninterrupted one. ``collate`` pads to the longest snapshot with masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from sim.traces import ENTRY_KEYS, SNAPSHOT_KEYS, TraceReader

# Per-entry keys the model and the loss read (others stay on disk for analysis).
MODEL_ENTRY_KEYS = ("embeddings", "levels", "span_width", "distance_to_cursor", "target_utilities",
                    "action_mask", "expand_cost", "collapse_refund", "group_id")
TAIL_KEYS = ("tail_gists", "tail_levels", "tail_mask")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation of trace snapshots (off for evaluation)."""

    jitter_p: float = 0.3
    """Probability of temporal jitter: keep every other entry (stride 2, random phase)."""
    noise_p: float = 0.2
    """Probability of adding Gaussian noise to the labelled targets."""
    noise_std: float = 0.05
    """Standard deviation of that noise (nats)."""

    def __post_init__(self) -> None:
        for name in ("jitter_p", "noise_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


class TraceDataset(Dataset):
    """Snapshots of a trace (optionally a subset of indices), augmented when ``augment`` is set."""

    def __init__(self, reader: TraceReader, indices: np.ndarray | None = None,
                 augment: AugmentConfig | None = None, seed: int = 0) -> None:
        self.reader = reader
        self.indices = np.arange(len(reader)) if indices is None else np.asarray(indices)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        snap = self.reader[int(self.indices[i])]
        item = {k: snap[k] for k in (*MODEL_ENTRY_KEYS, *TAIL_KEYS)}
        if self.augment is None:
            return item
        rng = np.random.default_rng([self.seed, self.epoch, int(self.indices[i])])
        n = item["levels"].shape[0]
        if n > 1 and rng.random() < self.augment.jitter_p:
            keep = np.arange(int(rng.integers(0, 2)), n, 2)
            item = {k: (v[keep] if k in MODEL_ENTRY_KEYS else v) for k, v in item.items()}
        if rng.random() < self.augment.noise_p:
            noise = rng.normal(0.0, self.augment.noise_std, item["target_utilities"].shape)
            item["target_utilities"] = np.where(item["action_mask"], item["target_utilities"] + noise,
                                                item["target_utilities"]).astype(np.float32)
        return item


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad per-entry arrays to the longest snapshot; adds ``valid_mask``. Padding is zeros (-1 for
    ``group_id``, so padding never joins a group)."""
    b = len(items)
    n = max(it["levels"].shape[0] for it in items)
    out: dict[str, torch.Tensor] = {}
    for k in MODEL_ENTRY_KEYS:
        first = items[0][k]
        dtype = ENTRY_KEYS[k][0]
        arr = np.full((b, n, *first.shape[1:]), -1 if k == "group_id" else 0, dtype=dtype)  # -1: no group
        for s, it in enumerate(items):
            arr[s, : it[k].shape[0]] = it[k]  # casts to the trace dtype
        out[k] = torch.from_numpy(arr)
    lengths = torch.tensor([it["levels"].shape[0] for it in items])
    out["valid_mask"] = torch.arange(n)[None, :] < lengths[:, None]
    for k in TAIL_KEYS:
        out[k] = torch.from_numpy(np.stack([it[k] for it in items]).astype(SNAPSHOT_KEYS[k][0]))
    out["span_width"] = out["span_width"].float()
    out["distance_to_cursor"] = out["distance_to_cursor"].float()
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
