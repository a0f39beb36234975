"""Trace datasets for LensNet: snapshots from ``megacontext.traces`` as padded, masked torch
batches.

``TraceDataset`` serves one snapshot per index, with the seed's augmentations (DESIGN §5): temporal
jitter (stride-2 subsample with a random phase, p = 0.3; see ``temporal_jitter`` for why it keeps
sibling groups whole) and utility noise (Gaussian, std 0.05, on labelled targets, p = 0.2). Each
draw comes from a generator keyed by (seed, epoch, index), so an augmentation never depends on the
order or the process that asked for it: a resumed run sees the same data as an uninterrupted one,
and data-parallel ranks that split a batch see the items one process would. ``collate`` pads to the
longest snapshot with masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from megacontext.traces import ENTRY_KEYS, FEATURE_KEY, SNAPSHOT_KEYS, TraceReader
from megacontext.working_context import ContextArrays

# Per-entry keys the model and the loss read (others stay on disk for analysis).
MODEL_ENTRY_KEYS = (
    "embeddings",
    "levels",
    "span_width",
    "distance_to_cursor",
    "target_utilities",
    "action_mask",
    "expand_cost",
    "collapse_refund",
    "group_id",
)
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


def jitter_units(group_id: np.ndarray) -> np.ndarray:
    """(N,) int64: the jitter unit of each entry, numbered 0, 1, ... in order of first appearance.
    A unit is a whole sibling group (all entries sharing an id >= 0) or one ungrouped entry."""
    n = group_id.shape[0]
    key = np.where(
        group_id >= 0, group_id, -1 - np.arange(n)
    )  # ungrouped entries: unique negative keys
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(
        np.argsort(first, kind="stable"), kind="stable"
    )  # unit rank by first member's slot
    return order[inverse.reshape(-1)]


def temporal_jitter(group_id: np.ndarray, phase: int) -> tuple[np.ndarray, np.ndarray]:
    """Stride-2 temporal jitter over *units*: keep every other unit (whole sibling group or single
    ungrouped entry) starting at ``phase`` (0 or 1). Returns (kept slots (K,), their group ids
    remapped to the new slot of each group's first member, -1 kept).

    Why whole groups: a collapse label is the NLL cost of collapsing the complete group, and the
    model reads each member's group mean; keeping half a group would keep the label while the group
    it describes is no longer in the input (and ids would point at slots that moved or no longer
    exist). Ungrouped entries (the tail, lone gists) are thinned one by one, as in the seed."""
    if phase not in (0, 1):
        raise ValueError(f"phase must be 0 or 1, got {phase}")
    units = jitter_units(group_id)
    keep = np.flatnonzero(units % 2 == phase)
    gid = group_id[keep]
    if keep.size:  # the new slot of each kept group's first member (kept groups are complete)
        kept_units = units[keep]
        unit, first = np.unique(kept_units, return_index=True)
        first_new = np.full(int(units.max()) + 1, -1, dtype=np.int64)
        first_new[unit] = first
        gid = np.where(gid >= 0, first_new[kept_units], -1)
    return keep, gid.astype(np.int64)


class TraceDataset(Dataset):
    """Snapshots of a trace (optionally a subset of indices), augmented when ``augment`` is set.
    Ablations: ``tail_rows`` keeps only the first rows of the tail latents (the tail gists without
    a task trace's query tokens), ``entry_features=False`` leaves the extra features out."""

    def __init__(
        self,
        reader: TraceReader,
        indices: np.ndarray | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        tail_rows: int | None = None,
        entry_features: bool = True,
    ) -> None:
        self.reader = reader
        self.indices = np.arange(len(reader)) if indices is None else np.asarray(indices)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.tail_rows = tail_rows  # keep only the first rows of the tail latents (ablations)
        self.entry_features = entry_features  # serve the traces' extra features, if any

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        snap = self.reader[int(self.indices[i])]
        item = {k: snap[k] for k in (*MODEL_ENTRY_KEYS, *TAIL_KEYS)}
        if self.tail_rows is not None:
            item.update({k: item[k][: self.tail_rows] for k in TAIL_KEYS})
        if FEATURE_KEY in snap and self.entry_features:
            item[FEATURE_KEY] = snap[FEATURE_KEY]
        if self.augment is None:
            return item
        rng = np.random.default_rng([self.seed, self.epoch, int(self.indices[i])])
        n_units = int(jitter_units(item["group_id"]).max()) + 1 if item["levels"].shape[0] else 0
        if n_units > 1 and rng.random() < self.augment.jitter_p:
            keep, gid = temporal_jitter(item["group_id"], int(rng.integers(0, 2)))
            item = {k: (v[keep] if k not in TAIL_KEYS else v) for k, v in item.items()}
            item["group_id"] = gid
        if rng.random() < self.augment.noise_p:
            noise = rng.normal(0.0, self.augment.noise_std, item["target_utilities"].shape)
            item["target_utilities"] = np.where(
                item["action_mask"], item["target_utilities"] + noise, item["target_utilities"]
            ).astype(np.float32)
        return item


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad per-entry arrays to the longest snapshot; adds ``valid_mask``. Padding is zeros (-1 for
    ``group_id``, so padding never joins a group)."""
    b = len(items)
    n = max(it["levels"].shape[0] for it in items)
    out: dict[str, torch.Tensor] = {}
    keys = (*MODEL_ENTRY_KEYS, FEATURE_KEY) if FEATURE_KEY in items[0] else MODEL_ENTRY_KEYS
    for k in keys:
        first = items[0][k]
        dtype = np.float32 if k == FEATURE_KEY else ENTRY_KEYS[k][0]
        arr = np.full(
            (b, n, *first.shape[1:]), -1 if k == "group_id" else 0, dtype=dtype
        )  # -1: no group
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


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device | str
) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def arrays_to_item(arr: ContextArrays, entry_features: np.ndarray | None = None) -> dict:
    """A ``ContextArrays`` as one unlabelled dataset item (targets zero, mask off), with the extra
    per-entry features when given."""
    n = arr.levels.shape[0]
    item = {
        "embeddings": arr.embeddings,
        "levels": arr.levels,
        "span_width": arr.span_width,
        "distance_to_cursor": arr.distance_to_cursor,
        "expand_cost": arr.expand_cost,
        "collapse_refund": arr.collapse_refund,
        "group_id": arr.group_id,
        "target_utilities": np.zeros(n, dtype=np.float32),
        "action_mask": np.zeros(n, dtype=bool),
        "tail_gists": arr.tail_gists,
        "tail_levels": arr.tail_levels,
        "tail_mask": arr.tail_mask,
    }
    assert set(MODEL_ENTRY_KEYS) <= set(item), "item lacks a model key"
    if entry_features is not None:
        item[FEATURE_KEY] = np.asarray(entry_features, dtype=np.float32)
    return item
