"""Strategies for LensNet batches: padded snapshots with masks, as the trace collate produces them.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st


@st.composite
def loss_batches(
    draw, *, max_b: int = 4, max_n: int = 10, dtype=torch.float64
) -> tuple[torch.Tensor, dict]:
    """(predictions, batch) with random padding, action masks, levels, costs; NaN in unlabelled
    targets."""
    b, n = draw(st.integers(1, max_b)), draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(0, n + 1, b)
    valid = np.arange(n)[None, :] < lengths[:, None]
    levels = np.where(valid, rng.integers(0, 3, (b, n)), 0)
    p_label = draw(st.sampled_from([0.0, 0.5, 1.0]))
    action = valid & (rng.random((b, n)) < p_label)
    # y often tied (labels are max(0, .) clipped), sometimes near the margin
    y = rng.choice([0.0, 0.05, 0.1, 0.15, -0.3, 1.0], (b, n)) + rng.normal(0, 0.5, (b, n)) * (
        rng.random((b, n)) < 0.5
    )
    y = np.where(action, y, np.nan)
    ec = np.where(valid & (levels >= 1), 3.0, 0.0)
    cr = np.where(valid & (rng.random((b, n)) < 0.5), 0.75, 0.0)
    pred = rng.normal(0, 1, (b, n)) * draw(st.sampled_from([0.01, 1.0, 10.0, 100.0]))
    t = lambda a, dt=dtype: torch.tensor(a, dtype=dt)  # noqa: E731
    batch = {
        "target_utilities": t(y),
        "action_mask": t(action, torch.bool),
        "valid_mask": t(valid, torch.bool),
        "levels": t(levels, torch.long),
        "span_width": t(np.where(valid, 4.0**levels, 0.0)),
        "expand_cost": t(ec),
        "collapse_refund": t(cr),
    }
    return t(pred), batch


@st.composite
def context_items(
    draw, *, max_tokens: int = 120, n_tail_gists: int | None = None, max_entries: int = 400
) -> dict[str, np.ndarray]:
    """A labelled dataset item (``lensnet.data.MODEL_ENTRY_KEYS`` + tail keys) of a real working
    context: its group ids are the allocator's (slot of each group's first member); ``n_tail_gists``
    tail
    gist slots (drawn from 0..6 when None); at most ``max_entries`` entries (b = 32 contexts run
    long)."""
    from lensnet.data import arrays_to_item
    from tests.strategies import working_contexts

    wc = draw(working_contexts(max_tokens=max_tokens).filter(lambda wc: len(wc) <= max_entries))
    item = arrays_to_item(
        wc.arrays(n_tail_gists=draw(st.integers(0, 6)) if n_tail_gists is None else n_tail_gists)
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    item["action_mask"] = wc.can_expand() | (item["group_id"] >= 0)
    item["target_utilities"] = np.where(item["action_mask"], rng.normal(size=len(wc)), 0.0).astype(
        np.float32
    )
    return item


def tiny_world():
    """The world of the tiny end-to-end study (b = 4, W_max 40, tail 8, d_model 8): traces of a few
    documents label in seconds."""
    from dataclasses import replace

    from megacontext.tree import TreeConfig
    from megacontext.working_context import ContextConfig
    from sim.streamworld.synthetic import SyntheticConfig
    from sim.streamworld.world import WorldConfig

    syn = replace(
        SyntheticConfig(), block_size=4, d_model=8, n_blocks=40, recent_window=6, n_recent=3
    )
    return WorldConfig(
        tree=TreeConfig(block_size=4, d_model=8),
        synthetic=syn,
        step_tokens=4,
        horizon=8,
        n_tail_gists=3,
        warmup_tokens=16,
        context=ContextConfig(w_max=40, tail_tokens=8),
    )
