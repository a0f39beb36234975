"""Trace data: temporal jitter keeps whole sibling groups with ids remapped, on real working
contexts (any tail, batch 1 and up); collated jittered batches run through LensNet; the jitter
regression at the study's tiny size."""

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lensnet.data import (
    MODEL_ENTRY_KEYS,
    AugmentConfig,
    TraceDataset,
    collate,
    jitter_units,
    temporal_jitter,
)
from lensnet.model import LensNet, LensNetConfig, group_mean
from tests.lensnet.strategies import context_items, tiny_world


def _jittered(item: dict, phase: int | None) -> dict:
    if phase is None:
        return item
    keep, gid = temporal_jitter(item["group_id"], phase)
    out = {k: (v[keep] if k in MODEL_ENTRY_KEYS else v) for k, v in item.items()}
    out["group_id"] = gid
    return out


@given(context_items(), st.sampled_from([0, 1]))
def test_jitter_keeps_whole_groups_and_remaps_their_ids(item, phase):
    g = item["group_id"]
    keep, gid = temporal_jitter(g, phase)
    other, _ = temporal_jitter(g, 1 - phase)
    assert np.all(np.diff(keep) > 0) and gid.shape == keep.shape
    assert np.array_equal(
        np.sort(np.concatenate([keep, other])), np.arange(len(g))
    )  # the two phases partition
    units = jitter_units(g)
    assert units.min(initial=0) == 0 and np.all(np.diff(np.unique(units)) == 1)
    assert np.all(units[keep] % 2 == phase)
    for s in np.unique(g[keep][g[keep] >= 0]):  # every kept group is complete, with one new id
        members = np.flatnonzero(g == s)
        assert np.isin(members, keep).all(), "a group was cut"
        new = gid[np.isin(keep, members)]
        assert np.all(new == new[0]) and keep[new[0]] == members[0], (
            "id is not the new slot of the first member"
        )
    assert np.array_equal(gid < 0, g[keep] < 0)
    assert gid.max(initial=-1) < len(keep)


@st.composite
def jittered_batches(draw, *, max_b: int = 4) -> list[dict]:
    """1..max_b items of one trace (one n_tail_gists), each jittered with phase 0 or 1, or left
    whole."""
    n_tail_gists = draw(st.integers(0, 6))
    b = draw(st.integers(1, max_b))
    return [
        _jittered(
            draw(context_items(n_tail_gists=n_tail_gists)), draw(st.sampled_from([None, 0, 1]))
        )
        for _ in range(b)
    ]


@given(jittered_batches())
def test_jittered_batches_keep_groups_apart(items):
    """No id reaches past its snapshot: group means equal a per-snapshot loop, and LensNet runs
    (fast and reference paths agree)."""
    batch = collate(items)
    b, n = batch["group_id"].shape
    assume(
        n > 0
    )  # a snapshot always holds an entry (T >= 1); an all-empty batch has nothing to group
    assert int(batch["group_id"].max()) < n
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(0))
    got = group_mean(x, batch["group_id"])
    for s, it in enumerate(items):
        for i, gi in enumerate(it["group_id"]):
            members = torch.from_numpy(np.flatnonzero(it["group_id"] == gi))
            want = x[s, members].mean(0) if gi >= 0 else torch.zeros(3)
            torch.testing.assert_close(got[s, i], want)
    torch.manual_seed(0)
    model = LensNet(
        LensNetConfig.tiny(batch["embeddings"].shape[-1], block_size=4, max_level=3)
    ).eval()
    torch.nn.init.normal_(model.head.weight)
    out = model(batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model.reference_forward(batch), atol=1e-4, rtol=1e-4)


def test_jitter_at_the_tiny_study_size(tmp_path):
    """The reported failure: W_max 40, tail 8, b 4 traces, every snapshot jittered, batches of 16
    (ids past the shorter padded length indexed out of bounds)."""
    from megacontext.traces import TraceReader
    from sim.labels import TraceArgs, generate_traces

    world = tiny_world()
    reader = TraceReader(
        generate_traces(TraceArgs(out=str(tmp_path), n_docs=2, seed=0, world=world, progress=False))
    )
    data = TraceDataset(reader, augment=AugmentConfig(jitter_p=1.0, noise_p=0.0), seed=0)
    plain = TraceDataset(reader)
    model = LensNet(LensNetConfig.tiny(8, block_size=4))
    for s in range(0, len(data), 16):
        idx = range(s, min(s + 16, len(data)))
        items = [data[i] for i in idx]
        assert torch.isfinite(model(collate(items))).all()
        for i, it in zip(idx, items, strict=True):  # labels travel with their entries
            rng = np.random.default_rng(
                [0, 0, i]
            )  # the dataset's draw: jitter (p = 1), then the phase
            assert rng.random() < 1.0
            keep, gid = temporal_jitter(plain[i]["group_id"], int(rng.integers(0, 2)))
            np.testing.assert_array_equal(it["group_id"], gid)
            for k in ("target_utilities", "action_mask", "levels", "collapse_refund"):
                np.testing.assert_array_equal(it[k], plain[i][k][keep])
