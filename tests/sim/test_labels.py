"""Counterfactual labels: the synthetic world's exact utilities, label semantics, trace generation.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sim.labels as labels_mod
from megacontext.labels import counterfactual_contexts, label_snapshot
from megacontext.traces import TraceReader
from megacontext.tree import ConfigError, TreeConfig
from megacontext.working_context import ContextConfig
from sim.labels import TraceArgs, generate_traces
from sim.streamworld.synthetic import SyntheticConfig, exact_utilities
from sim.streamworld.world import WorldConfig, synthetic_episode
from tests.strategies import random_walk


def small_world(**kw) -> WorldConfig:
    b = 4
    return WorldConfig(
        step_tokens=4,
        horizon=8,
        n_tail_gists=3,
        warmup_tokens=16,
        tree=TreeConfig(block_size=b, max_level=2, d_model=8),
        context=ContextConfig(w_max=40, tail_tokens=8),
        synthetic=SyntheticConfig(
            d_model=8, block_size=b, n_blocks=40, recent_window=6, n_recent=3
        ),
        **kw,
    )


@given(doc=st.integers(0, 10_000), steps=st.integers(0, 25), scale=st.sampled_from([0.5, 2.0]))
def test_labels_equal_closed_form_synthetic_utilities(doc, steps, scale):
    world = small_world()
    ep, _ = synthetic_episode(world, doc, seed=1)
    if not random_walk(ep, steps, np.random.default_rng(doc), scale):
        return
    ids, start = ep.query()
    snap = label_snapshot(ep.wc, ep.oracle, ids, start, world.n_tail_gists)
    gain, cost = exact_utilities(ep.oracle, ep.wc, world.horizon)
    np.testing.assert_allclose(snap["expand_gain"], gain, atol=1e-5)
    np.testing.assert_allclose(snap["collapse_cost"], cost, atol=1e-5)
    # y keeps both directions: + gain where it can expand, - cost where its group can collapse
    y = np.where(snap["can_expand"], gain, 0) - np.where(snap["can_collapse"], cost, 0)
    np.testing.assert_allclose(snap["target_utilities"], y, atol=1e-5)
    assert np.array_equal(snap["action_mask"], snap["can_expand"] | snap["can_collapse"])
    assert np.all(snap["expand_gain"] >= 0) and np.all(snap["collapse_cost"] >= 0)
    b = world.tree.block_size
    np.testing.assert_array_equal(snap["expand_cost"], np.where(snap["levels"] >= 1, b - 1, 0))
    np.testing.assert_allclose(
        snap["collapse_refund"], np.where(snap["can_collapse"], (b - 1) / b, 0)
    )
    assert snap["baseline_nll"] == pytest.approx(ep.nll())


def test_counterfactuals_ignore_the_budget_and_cover_every_action():
    world = small_world()
    ep, _ = synthetic_episode(world, 3, seed=0)
    for _ in range(12):
        ep.advance()
    base, variants = counterfactual_contexts(ep.wc, world.n_tail_gists)
    n_exp = int(base.can_expand.sum())
    n_groups = len(np.unique(base.group_id[base.group_id >= 0]))
    assert len(variants) == n_exp + n_groups
    b = world.tree.block_size
    for kind, _slot, v in variants:
        assert len(v.levels) == len(base.levels) + (b - 1 if kind == "expand" else -(b - 1))
        assert v.span_start[0] == 0 and v.span_start[-1] + v.span_width[-1] == base.n_tokens


def test_referenced_blocks_gain_by_level():
    """Expanding a referenced block helps by w * (info[l-1] - info[l]) * share; unreferenced: 0."""
    world = small_world()
    ep, doc = synthetic_episode(world, 5, seed=0)
    while ep.wc.n_tokens < 80:
        ep.advance()
    ids, start = ep.query()
    snap = label_snapshot(ep.wc, ep.oracle, ids, start, world.n_tail_gists)
    b = world.tree.block_size
    q_blocks = np.arange(start, start + world.horizon) // b
    referenced = set(np.concatenate([doc.ref_blocks[q] for q in np.unique(q_blocks)]).tolist())
    recent = set(range(start // b - doc.config.n_recent, start // b))
    for i in np.flatnonzero(snap["levels"] >= 1):
        blocks = set(
            range(snap["span_start"][i] // b, (snap["span_start"][i] + snap["span_width"][i]) // b)
        )
        if not blocks & (referenced | recent):
            assert snap["expand_gain"][i] == 0
        elif blocks & referenced:
            assert snap["expand_gain"][i] > 0


def test_trace_generation_resumes_after_a_crash(tmp_path, monkeypatch):
    world = small_world()
    args = dict(n_docs=3, world=world, shard_size=5, progress=False, seed=2)
    clean = TraceReader(
        generate_traces(TraceArgs(out=str(tmp_path / "clean"), **args)), require_complete=True
    )
    real = labels_mod.label_snapshot
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt("crash")
        return real(*a, **k)

    monkeypatch.setattr(labels_mod, "label_snapshot", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(TraceArgs(out=str(tmp_path / "crashy"), **args))
    monkeypatch.setattr(labels_mod, "label_snapshot", real)
    assert len(TraceReader(tmp_path / "crashy")) == 10  # two complete shards survived
    resumed = TraceReader(
        generate_traces(TraceArgs(out=str(tmp_path / "crashy"), **args)), require_complete=True
    )
    assert len(resumed) == len(clean)
    for k in ("target_utilities", "embeddings", "levels"):
        np.testing.assert_array_equal(resumed.entries[k], clean.entries[k])


def test_shards_split_documents_and_read_back_together(tmp_path):
    world = small_world()
    args = dict(n_docs=4, world=world, progress=False, out=str(tmp_path))
    whole = TraceReader(generate_traces(TraceArgs(**{**args, "out": str(tmp_path / "whole")})))
    for i in range(2):
        generate_traces(TraceArgs(shard=f"{i}/2", **args))
    parts = TraceReader(tmp_path)
    assert len(parts) == len(whole)
    assert sorted(parts.snapshots["doc_id"].tolist()) == sorted(whole.snapshots["doc_id"].tolist())
    with pytest.raises(ValueError, match="i/n"):
        generate_traces(TraceArgs(shard="2/2", **args))


def test_world_config_is_validated():
    with pytest.raises(ConfigError, match="must equal the tree"):
        WorldConfig(tree=TreeConfig(block_size=4, d_model=8))
    with pytest.raises(ConfigError, match="cannot hold"):
        small_world().__class__(
            step_tokens=4,
            horizon=8,
            n_tail_gists=3,
            warmup_tokens=16,
            tree=TreeConfig(block_size=4, max_level=1, d_model=8),
            context=ContextConfig(w_max=20, tail_tokens=8),
            synthetic=SyntheticConfig(d_model=8, block_size=4, n_blocks=40),
        )


def test_lm_traces_with_the_tiny_lm(tmp_path):
    from dataclasses import replace

    world = replace(small_world(), env="lm")
    out = generate_traces(
        TraceArgs(out=str(tmp_path), n_docs=1, world=world, progress=False, lm="tiny")
    )
    r = TraceReader(out, require_complete=True)
    assert len(r) > 5 and r.d_model == 64 and r.meta["oracle"]["kind"] == "lm"
    assert np.isfinite(r.entries["target_utilities"]).all()


def test_a_behaviour_scorer_moves_the_focus_between_snapshots(tmp_path):
    """With a behaviour (and no noise), the traces hold exactly the contexts that scorer visits
    (here recency's, replayed by hand), and its name is in the meta; random behaviour's differ."""
    from sim.policies import Recency

    world = small_world()
    args = dict(n_docs=1, world=world, progress=False, seed=3)
    traced = TraceReader(generate_traces(
        TraceArgs(out=str(tmp_path / "recency"), behaviour_scale=0.0, **args),
        behaviour=Recency()), require_complete=True)
    assert traced.meta["behaviour"] == "recency"
    ep, _ = synthetic_episode(world, 0, 3)
    visited = []
    while True:
        ep.advance()
        if not ep.can_query():
            break
        visited.append((ep.wc.levels.copy(), ep.wc.starts.copy()))
        ep.refocus(Recency().scores(ep.view()))
    assert len(traced) == len(visited)
    for i, (levels, starts) in enumerate(visited):
        np.testing.assert_array_equal(traced[i]["levels"], levels)
        np.testing.assert_array_equal(traced[i]["span_start"], starts)
    random = TraceReader(generate_traces(TraceArgs(out=str(tmp_path / "random"), **args)))
    assert "behaviour" not in random.meta  # (random behaviour's meta as it always was)
    assert any(not np.array_equal(random[i]["levels"], traced[i]["levels"])
               for i in range(len(random)))
