"""Focus allocator (DESIGN §4): legality, budget neutrality, swap rule, n_diff, cooldown, budget
restore."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megacontext.allocator import AllocatorConfig, FocusAllocator, mask_illegal, recency_scores
from megacontext.tree import ConfigError
from megacontext.working_context import BudgetExhausted, ContextConfig, WorkingContext
from tests.strategies import build_tree, score_vectors, working_contexts


@given(data=st.data())
def test_step_is_legal_and_budget_neutral(data):
    wc = data.draw(working_contexts())
    scores = data.draw(score_vectors(len(wc)))
    cfg = AllocatorConfig(n_diff=data.draw(st.integers(1, 6)))
    b = wc.block_size
    before = len(wc)
    groups = {(int(wc.levels[s]) + 1, int(wc.indices[s]) // b) for s in wc.group_starts()}
    masked = mask_illegal(scores, wc.can_expand(), wc.group_ids() >= 0)
    score_of = {
        (int(lv), int(ix)): u for lv, ix, u in zip(wc.levels, wc.indices, masked, strict=True)
    }
    actions = FocusAllocator(cfg).step(wc, scores)
    wc.check_invariants()
    assert len(actions) <= cfg.n_diff
    n_exp = sum(a.kind == "expand" for a in actions)
    n_col = sum(a.kind == "collapse" for a in actions)
    # accounting identity: slots after = before + sum c+ (expands) - sum (b-1) (collapses)
    assert (
        len(wc)
        == before + n_exp * (b - 1) - n_col * (b - 1)
        == before + sum(a.slot_delta for a in actions)
    )
    assert len(wc) <= wc.config.w_max
    for a in actions:
        if a.kind == "expand":
            assert a.level >= 1 and score_of[(a.level, a.index)] > cfg.tau_expand
        else:
            assert (a.level, a.index) in groups  # a legal group of the pre-step context
    touched = [(a.kind, a.level, a.index) for a in actions]
    assert len(set(touched)) == len(touched)


@given(wc=working_contexts())
def test_scores_below_threshold_change_nothing(wc):
    before = (wc.levels.copy(), wc.indices.copy())
    scores = np.full(len(wc), 0.2)  # == tau_expand: not above it
    scores[::2] = -5.0
    assert FocusAllocator().step(wc, scores) == []
    np.testing.assert_array_equal(wc.levels, before[0])
    np.testing.assert_array_equal(wc.indices, before[1])


def _coarse_context(extra_slots: int, b: int = 4, n: int = 64, tail: int = 4) -> WorkingContext:
    """The coarsest legal cover of ``n`` tokens, with ``extra_slots`` free slots."""
    tree = build_tree(b, 2, n)
    wc = WorkingContext(tree, ContextConfig(w_max=n + tail + 2 * b, tail_tokens=tail))
    wc.append_tokens(n)
    while (starts := wc.group_starts()).size:
        wc.collapse(int(wc.levels[starts[0]]) + 1, int(wc.indices[starts[0]]) // b)
    wc.config = ContextConfig(w_max=len(wc) + extra_slots, tail_tokens=tail)
    wc.check_invariants()
    return wc


def test_expand_fits_in_free_slots_without_collapse():
    wc = _coarse_context(extra_slots=3)
    free = wc.free_slots()
    gists = np.flatnonzero(wc.levels >= 1)
    scores = np.zeros(len(wc))
    scores[gists[0]] = 1.0
    actions = FocusAllocator().step(wc, scores)
    assert free >= 3 and [a.kind for a in actions] == ["expand"]


def test_swap_rule_gain_must_exceed_cost():
    b = 4
    for gain, cost, expect in [(1.0, -0.5, True), (0.5, -1.0, False), (0.6, -0.6, False)]:
        wc = _coarse_context(extra_slots=0)  # no free slot: an expand must be paid for
        gists = np.flatnonzero(wc.levels >= 1)
        wc.expand(int(wc.levels[gists[0]]), int(wc.indices[gists[0]]))  # makes one payable group
        wc.config = ContextConfig(w_max=len(wc), tail_tokens=4)
        starts = wc.group_starts()
        assert starts.size == 1
        scores = np.zeros(len(wc))
        s = int(starts[0])
        scores[s : s + b] = cost  # the only payer
        gists = [i for i in np.flatnonzero(wc.levels >= 1) if not s <= i < s + b]
        scores[gists[-1]] = gain
        actions = FocusAllocator().step(wc, scores)
        assert (len(actions) == 2) is expect, (gain, cost, actions)
        if expect:
            assert [a.kind for a in actions] == ["collapse", "expand"]


def test_cheapest_group_pays_first():
    wc = _coarse_context(extra_slots=0, b=2, n=32, tail=2)
    wc.expand(2, 0)  # open the two oldest L2 gists: two L1 sibling groups that can pay
    wc.expand(2, 1)
    wc.config = ContextConfig(w_max=len(wc), tail_tokens=2)
    starts = wc.group_starts()
    assert starts.size >= 2
    scores = np.zeros(len(wc))
    for k, s in enumerate(starts):
        scores[s : s + 2] = -1.0 - k  # first group cheapest
    scores[starts[0] : starts[0] + 2] = -0.1
    gists = [i for i in np.flatnonzero(wc.levels >= 1) if wc.group_ids()[i] < 0]
    scores[gists[0]] = 5.0
    actions = FocusAllocator(AllocatorConfig(n_diff=2)).step(wc, scores)
    assert actions[0].kind == "collapse"
    assert (
        actions[0].index * 2 ** actions[0].level == 0
    )  # the group at slot starts[0] covers from token 0


def _two_payable_groups() -> tuple[WorkingContext, np.ndarray, np.ndarray]:
    """A full context with two payable L1 groups (b = 2): the first holds an expand candidate (so
    its mean is the highest), the second is merely cheap; plus scores naming a gist to expand."""
    wc = _coarse_context(extra_slots=0, b=2, n=32, tail=2)
    wc.expand(2, 0)
    wc.expand(2, 1)
    wc.config = ContextConfig(w_max=len(wc), tail_tokens=2)
    starts = wc.group_starts()[:2]
    scores = np.zeros(len(wc))
    scores[starts[0] : starts[0] + 2] = [1.0, -0.2]  # a candidate (1.0 > tau_expand): mean 0.4
    scores[starts[1] : starts[1] + 2] = -0.1  # mean -0.1: cheaper than any other group
    others = np.flatnonzero(wc.group_ids() < 0)
    scores[others[wc.levels[others] >= 1][0]] = 5.0
    return wc, scores, starts


def test_a_group_holding_an_expand_candidate_never_pays():
    wc, scores, starts = _two_payable_groups()
    payer = (int(wc.levels[starts[1]]) + 1, int(wc.indices[starts[1]]) // 2)
    actions = FocusAllocator(AllocatorConfig(n_diff=2)).step(wc, scores)
    assert [(a.kind, a.level, a.index) for a in actions][0] == ("collapse", *payer)
    assert [a.kind for a in actions] == ["collapse", "expand"]
    # the budget restore likewise takes it last
    wc, scores, starts = _two_payable_groups()
    payer = (int(wc.levels[starts[1]]) + 1, int(wc.indices[starts[1]]) // 2)
    wc.config = ContextConfig(w_max=len(wc) - 1, tail_tokens=2)
    (a,) = FocusAllocator().enforce_budget(wc, scores)
    assert (a.level, a.index) == payer


def test_cooldown_blocks_reversal_then_expires():
    tree = build_tree(2, 2, 16)
    wc = WorkingContext(tree, ContextConfig(w_max=32, tail_tokens=2))
    wc.append_tokens(16)
    alloc = FocusAllocator(AllocatorConfig(cooldown=2))
    wc.collapse(1, 0)
    alloc._touched[(1, 0)] = (0, "collapse")
    # Expanding (1, 0) at steps 1 and 2 reverses a collapse made at step 0: refused.
    for _ in range(2):
        scores = np.where((wc.levels == 1) & (wc.indices == 0), 1.0, 0.0)
        assert alloc.step(wc, scores) == []
    scores = np.where((wc.levels == 1) & (wc.indices == 0), 1.0, 0.0)
    assert [a.kind for a in alloc.step(wc, scores)] == ["expand"]  # step 3: allowed


def test_nan_inf_and_bad_shapes_raise_and_leave_state_intact():
    wc = _coarse_context(extra_slots=3)
    before = (wc.levels.copy(), wc.indices.copy())
    alloc = FocusAllocator()
    for bad in [
        np.full(len(wc), np.nan),
        np.r_[np.inf, np.zeros(len(wc) - 1)],
        np.zeros(len(wc) + 1),
    ]:
        with pytest.raises(ValueError, match="finite|shape"):
            alloc.step(wc, bad)
    np.testing.assert_array_equal(wc.levels, before[0])
    np.testing.assert_array_equal(wc.indices, before[1])
    assert alloc.step_count == 0


def test_enforce_budget_restores_or_raises():
    tree = build_tree(2, 1, 64)
    wc = WorkingContext(tree, ContextConfig(w_max=8, tail_tokens=2))
    alloc = FocusAllocator()
    wc.append_tokens(10)  # 10 L0 > 8: two collapses, the oldest groups first (no scores)
    actions = alloc.enforce_budget(wc)
    wc.check_invariants()
    assert len(wc) == 8 and sorted((a.kind, a.index) for a in actions) == [
        ("collapse", 0),
        ("collapse", 1),
    ]
    wc.append_tokens(2)
    assert sorted(a.index for a in alloc.enforce_budget(wc)) == [2, 3]
    with pytest.raises(BudgetExhausted, match="at least 11 slots"):
        wc.append_tokens(8)  # 20 tokens, tail 2: coarsest = 9 L1 + 2 L0 = 11 > 8, max_level 1
    assert wc.n_tokens == 12  # refused whole: nothing appended, nothing dropped
    wc.append_tokens(2)
    alloc.enforce_budget(wc)  # now the coarsest cover: 6 L1 + 2 L0 = 8
    wc.config = ContextConfig(
        w_max=7, tail_tokens=2
    )  # shrink the budget under it behind the API's back
    with pytest.raises(BudgetExhausted, match="no legal collapse"):
        alloc.enforce_budget(wc)


def test_enforce_budget_uses_scores_cheapest_first():
    tree = build_tree(2, 2, 16)
    wc = WorkingContext(tree, ContextConfig(w_max=15, tail_tokens=2))
    wc.append_tokens(14)
    wc.append_tokens(2)
    scores = np.full(16, -1.0)
    scores[8:10] = -0.01  # group (1, 4) is cheapest
    [a] = FocusAllocator().enforce_budget(wc, scores)
    assert (a.kind, a.level, a.index) == ("collapse", 1, 4)


def test_mask_illegal_same_on_numpy_and_torch():
    rng = np.random.default_rng(0)
    u = rng.normal(size=50)
    ce, cc = rng.random(50) < 0.5, rng.random(50) < 0.5
    ref = np.where((u > 0) & ~ce, 0, np.where((u < 0) & ~cc, 0, u))
    np.testing.assert_allclose(mask_illegal(u, ce, cc), ref)
    got = mask_illegal(torch.tensor(u), torch.tensor(ce), torch.tensor(cc)).numpy()
    np.testing.assert_allclose(got, ref)


def test_allocator_config_validation():
    with pytest.raises(ConfigError, match="n_diff"):
        AllocatorConfig(n_diff=0)
    with pytest.raises(ConfigError, match="finite"):
        AllocatorConfig(tau_swap=float("nan"))


# ------------------------------------------------------------------ one pass: restore + refocus
def _over_budget(
    b: int = 2, n: int = 12, extra: int = 2, w_max: int = 8, tail: int = 2
) -> WorkingContext:
    """A context restored to ``w_max`` (oldest first) that then ingests ``extra`` tokens: over
    budget."""
    tree = build_tree(b, 2, n + extra)
    wc = WorkingContext(tree, ContextConfig(w_max=w_max, tail_tokens=tail))
    wc.append_tokens(n)
    FocusAllocator().enforce_budget(wc)
    wc.append_tokens(extra)
    assert len(wc) > w_max
    return wc


def test_step_restores_the_budget_with_the_scores():
    # Score-blind restore collapses the oldest group; the one pass collapses the group its scores
    # value least.
    wc = _over_budget(extra=1)  # one slot over: one forced collapse (b - 1 = 1)
    starts = wc.group_starts()
    assert starts.size >= 2
    scores = np.full(len(wc), -1.0)
    young = int(starts[-1])
    scores[young : young + 2] = -0.01  # the youngest legal group is the cheapest to give up
    actions = FocusAllocator().step(wc, scores)
    wc.check_invariants()
    forced = [a for a in actions if a.forced]
    assert len(wc) <= wc.config.w_max and len(forced) == 1
    assert forced[0].index * 2 ** forced[0].level == int(
        wc.starts[young]
    )  # parent covers that group's span
    assert all(a.kind == "collapse" for a in forced)


def test_forced_restore_starts_no_cooldown():
    # A restore collapse at step s must not block a deliberate expand of the same node at step s + 1
    # (old behaviour: the restore entered the cooldown table and refused it for `cooldown` steps).
    wc = _over_budget(n=14, extra=1, w_max=10)
    alloc = FocusAllocator(AllocatorConfig(cooldown=2))
    scores = recency_scores(wc)  # restore the oldest group, expand nothing
    [restore] = [a for a in alloc.step(wc, scores) if a.forced]
    assert len(wc) <= wc.config.w_max
    wc.config = ContextConfig(
        w_max=len(wc) + 1, tail_tokens=2
    )  # room for one expand (b - 1 = 1 slot)
    scores = np.where((wc.levels == restore.level) & (wc.indices == restore.index), 1.0, 0.0)
    actions = alloc.step(wc, scores)
    assert [(a.kind, a.level, a.index) for a in actions] == [
        ("expand", restore.level, restore.index)
    ]


def test_restore_never_reexpands_its_own_collapse_in_the_same_pass():
    wc = _over_budget()
    alloc = FocusAllocator()
    scores = np.where(
        wc.levels >= 1, 5.0, -0.01
    )  # the members' mean would make the parent an expand candidate
    actions = alloc.step(wc, scores)
    wc.check_invariants()
    forced = {(a.level, a.index) for a in actions if a.forced}
    assert not forced & {(a.level, a.index) for a in actions if a.kind == "expand"}


@given(data=st.data())
def test_step_over_budget_is_legal(data):
    wc = data.draw(working_contexts())
    b = wc.block_size
    extra = data.draw(st.integers(0, 3 * b))
    wc.tree.ingest(np.zeros(extra, dtype=np.int64), np.zeros((extra, wc.tree.config.d_model)))
    try:
        wc.append_tokens(extra)
    except BudgetExhausted:
        return
    before = len(wc)
    scores = data.draw(score_vectors(len(wc)))
    cfg = AllocatorConfig(n_diff=data.draw(st.integers(1, 6)))
    actions = FocusAllocator(cfg).step(wc, scores)
    wc.check_invariants()  # budget included
    forced = [a for a in actions if a.forced]
    assert (
        all(a.kind == "collapse" for a in forced) and actions[: len(forced)] == forced
    )  # restore first
    assert len(actions) - len(forced) <= cfg.n_diff
    assert len(wc) == before + sum(a.slot_delta for a in actions)
    if before <= wc.config.w_max:
        assert not forced
