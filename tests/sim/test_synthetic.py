"""The synthetic world's past-only reference scorer (``cue_scores``) against the exact utilities,
and the guarantee that it reads no future."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree import TreeConfig
from megacontext.working_context import ContextConfig
from sim.policies import CueReference, GreedyOracle, Recency
from sim.streamworld.synthetic import SyntheticConfig, cue_scores, exact_utilities
from sim.streamworld.world import (
    HELD_OUT_FIRST_DOC,
    WorldConfig,
    evaluate_policy,
    nll_gap_recovered,
    synthetic_episode,
)
from tests.strategies import random_walk


def clean_world(**synthetic) -> WorldConfig:
    """b = 4, orthonormal keys (n_blocks <= d/2), H = two blocks, K = b (the newest L1 gist is the
    block just before the cursor)."""
    b, d = 4, 64
    return WorldConfig(
        step_tokens=b,
        horizon=2 * b,
        n_tail_gists=3,
        warmup_tokens=16,
        tree=TreeConfig(block_size=b, max_level=2, d_model=d),
        context=ContextConfig(w_max=24, tail_tokens=8),
        synthetic=SyntheticConfig(
            d_model=d,
            block_size=b,
            n_blocks=30,
            recent_window=6,
            n_recent=3,
            **{"noise": 0.0, "weight_min": 1.5, "weight_max": 1.5, **synthetic},
        ),
    )


@settings(max_examples=30, deadline=None)
@given(doc=st.integers(0, 10_000), steps=st.integers(0, 20))
def test_cue_equals_the_exact_utilities_when_every_reference_is_single(doc, steps):
    """Noise-free, one weight: the cue scorer is exact wherever no block is referenced by both
    query blocks (the one thing the cue half cannot show)."""
    world = clean_world()
    ep, d = synthetic_episode(world, doc, seed=3)
    if not random_walk(ep, steps, np.random.default_rng(doc)):
        return
    b = world.tree.block_size
    q = ep.wc.n_tokens // b
    upcoming = [set(d.ref_blocks[j].tolist()) for j in (q, q + 1) if j < len(d.ref_blocks)]
    if len(upcoming) == 2 and upcoming[0] & upcoming[1]:
        return
    gain, cost = exact_utilities(ep.oracle, ep.wc, world.horizon)
    arr = ep.arrays()
    y = np.where(arr.can_expand, gain, 0) - np.where(arr.can_collapse, cost, 0)
    np.testing.assert_allclose(cue_scores(arr, world.synthetic), y, atol=1e-6)


def test_cue_reads_no_future():
    """Scores up to cursor T are unchanged when everything after T (the query window included) is
    replaced by other tokens: the reference uses only what LensNet receives."""
    world = clean_world(noise=0.15, weight_min=1.0, weight_max=2.0)
    rng = np.random.default_rng(0)
    policy = CueReference()
    for cut in (40, 64, 96):
        a, _ = synthetic_episode(world, 7, seed=0)
        b, _ = synthetic_episode(world, 7, seed=0)
        b.embeddings = b.embeddings.copy()
        b.embeddings[cut:] = rng.normal(size=b.embeddings[cut:].shape)
        b.token_ids = b.token_ids.copy()
        b.token_ids[cut:] = rng.integers(0, 1000, b.token_ids[cut:].shape)
        acted = 0
        while a.wc.n_tokens < cut:
            a.advance()
            b.advance()
            sa = cue_scores(a.arrays(), world.synthetic)
            np.testing.assert_array_equal(sa, cue_scores(b.arrays(), world.synthetic))
            acted += int(np.any(sa > 0))
            policy.apply(a)
            policy.apply(b)
        assert a.wc.n_tokens == cut and acted > 0  # the scorer did act on what it saw
        assert not np.array_equal(a.query()[0], b.query()[0])  # while the futures differ


def test_cue_recovers_most_of_the_oracle_gap_on_the_default_world():
    """End to end at the default sizes (4 held-out documents): far above recency, below the oracle.
    """
    world = WorldConfig()
    docs = list(range(HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + 4))
    r = {
        p.name: evaluate_policy(p, world, docs, 11, progress=False)
        for p in (Recency(), GreedyOracle(), CueReference())
    }
    ngr = nll_gap_recovered(r)["cue"]
    assert 0.8 < ngr <= 1.0 + 1e-9


def test_cue_refuses_a_non_synthetic_episode():
    from sim.policy import FocusView

    view = FocusView(wc=None, n_tail_gists=0, oracle=object(), target_ids=np.zeros(0, np.int64))
    with pytest.raises(TypeError, match="synthetic"):
        CueReference().scores(view)
