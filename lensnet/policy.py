"""LensNet as a focus policy: score the episode's working context, hard-mask, hand to the allocator."""

from __future__ import annotations

import numpy as np
import torch

from lensnet.data import MODEL_ENTRY_KEYS, collate
from lensnet.model import LensNet
from sim.allocator import Action
from sim.working_context import ContextArrays
from sim.world import Episode


def arrays_to_item(arr: ContextArrays) -> dict:
    """A ``ContextArrays`` as one unlabelled dataset item (targets zero, mask off)."""
    n = arr.levels.shape[0]
    item = {
        "embeddings": arr.embeddings, "levels": arr.levels, "span_width": arr.span_width,
        "distance_to_cursor": arr.distance_to_cursor, "expand_cost": arr.expand_cost,
        "collapse_refund": arr.collapse_refund, "group_id": arr.group_id, "target_utilities": np.zeros(n, dtype=np.float32),
        "action_mask": np.zeros(n, dtype=bool),
        "tail_gists": arr.tail_gists, "tail_levels": arr.tail_levels, "tail_mask": arr.tail_mask,
    }
    assert set(MODEL_ENTRY_KEYS) <= set(item), "item lacks a model key"
    return item


class LensNetPolicy:
    """LensNet's calibrated scores (``LensNet.score``: raw x ``score_scale``); ``scale`` overrides
    the model's calibration (``scale=1``: the raw scores, to show what calibration adds)."""

    name = "lensnet"

    def __init__(self, model: LensNet, device: torch.device | str = "cpu", scale: float | None = None,
                 name: str = "lensnet") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.scale, self.name = scale, name

    def scores(self, arr: ContextArrays):
        batch = {k: v.to(self.device) for k, v in collate([arrays_to_item(arr)]).items()}
        u = self.model.score(batch)[0].double().cpu().numpy()
        return u if self.scale is None else u * (self.scale / self.model.score_scale)

    def apply(self, ep: Episode) -> list[Action]:
        return ep.refocus(self.scores(ep.arrays()))
