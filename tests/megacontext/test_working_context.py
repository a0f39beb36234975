"""Working-context invariants of DESIGN §2 as properties, and broken contexts caught by name."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megacontext.tree import ConfigError
from megacontext.working_context import (
    ContextConfig,
    IllegalAction,
    InvariantViolation,
    WorkingContext,
    min_slots,
)
from tests.strategies import build_tree, working_contexts


@given(wc=working_contexts())
def test_generated_contexts_hold_every_invariant(wc):
    wc.check_invariants()
    starts, ends, b = wc.starts, wc.ends, wc.block_size
    assert len(wc) <= wc.config.w_max  # budget
    assert (
        starts[0] == 0 and ends[-1] == wc.n_tokens and np.all(ends[:-1] == starts[1:])
    )  # contiguity
    assert np.all(starts % b**wc.levels == 0)  # block alignment
    assert np.all(ends - starts == b**wc.levels)  # level consistency
    assert np.all(np.diff(starts) > 0)  # monotonic timeline
    assert np.all(np.diff(wc.position_ids()) > 0)  # positions
    assert np.all(wc.levels[ends > wc.n_tokens - wc.config.tail_tokens] == 0)  # recency tail


@given(wc=working_contexts())
def test_arrays_agree_with_tree_and_legality(wc):
    a = wc.arrays(n_tail_gists=4)
    b = wc.block_size
    for i in range(len(wc)):  # tree consistency: embedding is the node's own
        np.testing.assert_array_equal(
            a.embeddings[i], wc.tree.embeddings(int(a.levels[i]))[a.node_index[i]]
        )
    assert np.all(a.can_expand == (a.levels >= 1))
    np.testing.assert_array_equal(a.expand_cost, np.where(a.levels >= 1, b - 1, 0))
    np.testing.assert_allclose(a.collapse_refund, np.where(a.can_collapse, (b - 1) / b, 0))
    np.testing.assert_array_equal(a.distance_to_cursor, wc.n_tokens - a.span_start - a.span_width)
    # groups: exactly b consecutive same-level siblings, outside the tail, below max_level
    for g in np.unique(a.group_id[a.group_id >= 0]):
        members = np.flatnonzero(a.group_id == g)
        assert members.tolist() == list(range(g, g + b))
        assert len(set(a.levels[members].tolist())) == 1 and a.levels[g] < wc.max_level
        assert a.node_index[g] % b == 0 and np.all(np.diff(a.node_index[members]) == 1)
        assert (
            a.span_start[members[-1]] + a.span_width[members[-1]]
            <= wc.n_tokens - wc.config.tail_tokens
        )
    # refunds sum to what the collapses would free
    assert np.isclose(
        a.collapse_refund.sum(), (b - 1) * len(np.unique(a.group_id[a.group_id >= 0]))
    )
    n_upper = sum(wc.tree.n_nodes(lv) > 0 for lv in range(2, wc.max_level + 1))
    assert a.tail_mask.sum() == min(4, n_upper + wc.tree.n_nodes(1))
    assert np.all(a.tail_levels[a.tail_mask] >= 1) and np.all(a.tail_gists[~a.tail_mask] == 0)
    if wc.config.position_mode == "centre":
        assert np.all(a.position_ids == a.span_start + a.span_width // 2)


@given(wc=working_contexts(), data=st.data())
def test_expand_then_collapse_is_identity(wc, data):
    gists = np.flatnonzero(wc.levels >= 1)
    if gists.size == 0:
        return
    i = int(gists[data.draw(st.integers(0, gists.size - 1))])
    level, index = int(wc.levels[i]), int(wc.indices[i])
    before = (wc.levels.copy(), wc.indices.copy())
    roomy = WorkingContext(
        wc.tree,
        ContextConfig(
            w_max=max(len(wc), wc.config.w_max) + wc.block_size, tail_tokens=wc.config.tail_tokens
        ),
    )
    roomy.levels, roomy.indices, roomy.n_tokens = before[0].copy(), before[1].copy(), wc.n_tokens
    assert roomy.expand(level, index) == wc.block_size - 1
    roomy.check_invariants()
    assert len(roomy) == len(wc) + wc.block_size - 1
    assert roomy.collapse(level, index) == -(wc.block_size - 1)
    np.testing.assert_array_equal(roomy.levels, before[0])
    np.testing.assert_array_equal(roomy.indices, before[1])


@given(wc=working_contexts())
def test_min_slots_is_the_coarsest_cover(wc):
    """Collapsing every legal group until none is left reaches exactly min_slots(T)."""
    while (starts := wc.group_starts()).size:
        s = int(starts[0])
        wc.collapse(int(wc.levels[s]) + 1, int(wc.indices[s]) // wc.block_size)
        wc.check_invariants()
    assert len(wc) == min_slots(wc.n_tokens, wc.block_size, wc.max_level, wc.config.tail_tokens)


def _ctx(b=2, max_level=2, n=16, tail_tokens=2, w_max=32):
    tree = build_tree(b, max_level, n)
    wc = WorkingContext(tree, ContextConfig(w_max=w_max, tail_tokens=tail_tokens))
    wc.append_tokens(n)
    return wc


@pytest.mark.parametrize(
    ("corrupt", "invariant"),
    [
        (
            lambda wc: (
                setattr(wc, "indices", np.delete(wc.indices, 3))
                or setattr(wc, "levels", np.delete(wc.levels, 3))
            ),
            "contiguity",
        ),
        (
            lambda wc: (
                setattr(wc, "indices", np.r_[wc.indices[:4], wc.indices[3:]])
                or setattr(wc, "levels", np.r_[wc.levels[:4], wc.levels[3:]])
            ),
            "contiguity",
        ),
        (lambda wc: setattr(wc, "n_tokens", wc.n_tokens + 1), "contiguity"),
        (lambda wc: setattr(wc, "levels", np.r_[5, wc.levels[1:]]), "tree_consistency"),
        (lambda wc: setattr(wc, "config", ContextConfig(w_max=3, tail_tokens=2)), "budget"),
    ],
)
def test_broken_context_is_caught_by_name(corrupt, invariant):
    wc = _ctx()
    wc.check_invariants()
    corrupt(wc)
    with pytest.raises(InvariantViolation, match=invariant) as err:
        wc.check_invariants()
    assert err.value.invariant == invariant


def test_misaligned_gist_and_gist_in_tail_are_caught():
    wc = _ctx(b=2, n=16, tail_tokens=2)
    # A gist standing for the wrong span: L1 node 1 covers [2, 4) but sits where [1, 3) should be.
    wc.collapse(1, 0)  # [0,2) -> L1#0
    wc.levels = np.r_[0, 1, wc.levels[2:]][: len(wc.levels)]
    with pytest.raises(InvariantViolation, match="contiguity"):
        wc.check_invariants()
    wc = _ctx(b=2, n=16, tail_tokens=4)
    wc.tail_start  # noqa: B018
    wc.levels, wc.indices = np.r_[wc.levels[:-2], 1], np.r_[wc.indices[:-2], 7]
    with pytest.raises(InvariantViolation, match="recency_tail"):
        wc.check_invariants()
    wc = _ctx(b=2, n=16, tail_tokens=4)
    wc.levels, wc.indices = np.r_[1, 1, wc.levels[4:]], np.r_[0, 1, wc.indices[4:]]
    wc.check_invariants()
    wc.indices = np.r_[1, 0, wc.indices[2:]]
    with pytest.raises(InvariantViolation, match="contiguity"):
        wc.check_invariants()


class _WideGists(WorkingContext):
    """A wrong span derivation: every gist one token wider than b**level."""

    @property
    def widths(self) -> np.ndarray:
        return super().widths + (self.levels > 0)


class _LateGists(WorkingContext):
    """A wrong span derivation: every gist starts one token late (its width right)."""

    @property
    def starts(self) -> np.ndarray:
        return super().starts + (self.levels > 0)


@pytest.mark.parametrize(
    ("broken", "invariant"), [(_WideGists, "level_consistency"), (_LateGists, "block_alignment")]
)
def test_a_wrong_span_derivation_is_caught_by_name(broken, invariant):
    """Entries are node names, so no (levels, indices) arrays can misalign a span or give it the
    wrong
    width (a misplaced gist breaks contiguity, see above); what can is the derivation of the spans
    every consumer reads, and check_invariants checks those."""
    wc = _ctx(b=2, n=16, tail_tokens=2)
    wc.collapse(1, 1)
    wc.collapse(1, 2)  # gists over [2, 4) and [4, 6)
    wc.check_invariants()
    wc.__class__ = broken
    with pytest.raises(InvariantViolation, match=invariant) as err:
        wc.check_invariants()
    assert err.value.invariant == invariant


def test_illegal_actions_raise():
    wc = _ctx(b=2, n=16, tail_tokens=4)
    with pytest.raises(IllegalAction, match="L0"):
        wc.expand(0, 3)
    with pytest.raises(IllegalAction, match="not in the working context"):
        wc.expand(1, 0)
    with pytest.raises(IllegalAction, match="recency tail"):
        wc.collapse(1, 7)  # tokens 14, 15 are in the tail
    with pytest.raises(IllegalAction, match="level"):
        wc.collapse(3, 0)
    wc.collapse(1, 0)
    wc.collapse(1, 1)
    wc.collapse(2, 0)
    with pytest.raises(IllegalAction):
        wc.collapse(3, 0)  # max_level never collapses
    with pytest.raises(ValueError, match="cannot append"):
        wc.append_tokens(1)


def test_config_is_validated_up_front():
    tree = build_tree(32, 2, 10)
    with pytest.raises(ConfigError, match="w_max"):
        WorkingContext(tree, ContextConfig(w_max=128, tail_tokens=128))
    with pytest.raises(ConfigError, match="position_mode"):
        ContextConfig(position_mode="middle")
    with pytest.raises(ConfigError, match="tail"):
        ContextConfig(tail_tokens=-1)


def test_centre_positions_refuse_long_documents():
    tree = build_tree(2, 1, 10)
    wc = WorkingContext(tree, ContextConfig(w_max=16, tail_tokens=2, position_mode="centre"))
    wc.append_tokens(10)
    assert wc.position_ids(max_positions=16).tolist() == list(range(10))
    with pytest.raises(ValueError, match="centre"):
        wc.position_ids(max_positions=8)


def test_shrink_tail_only_shrinks_and_frees_the_tokens_it_releases():
    tree = build_tree(4, 2, 64)
    wc = WorkingContext(tree, ContextConfig(w_max=80, tail_tokens=16))
    wc.append_tokens(64)
    before = set(wc.group_starts().tolist())
    copy = wc.copy()
    with pytest.raises(ValueError, match="only\\s+shrink"):
        wc.shrink_tail(17)
    wc.shrink_tail(4)
    wc.check_invariants()
    assert wc.tail_start == 60 and copy.config.tail_tokens == 16  # copies keep their tail
    assert before < set(wc.group_starts().tolist())  # the released L0 blocks may now collapse
