"""Stateful test: the tree + working context + allocator against a tiny independent model.

The model is a plain list of covered spans ``(start, end, level)`` updated only from the actions the
real object reports; after every step every invariant of DESIGN §2 is re-checked and the real
context must cover exactly the model's spans. ``STEPS`` counts the rules run; the pytest summary
prints the total (the ``ci`` profile must reach 10^5).
"""

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.tree import MegaContextTree, TreeConfig
from megacontext.working_context import (
    BudgetExhausted,
    ContextConfig,
    IllegalAction,
    WorkingContext,
    min_slots,
)
from tests.strategies import seeded_score_vectors, tree_shapes

STEPS = {"rules": 0, "machines": 0}


class FocusMachine(RuleBasedStateMachine):
    @initialize(
        shape=tree_shapes(max_block=4),
        tail_blocks=st.integers(0, 2),
        slack=st.integers(0, 6),
        seed=st.integers(0, 2**16),
    )
    def setup(self, shape, tail_blocks, slack, seed):
        b, max_level = shape
        self.b, self.max_level = b, max_level
        self.rng = np.random.default_rng(seed)
        self.tree = MegaContextTree(TreeConfig(block_size=b, max_level=max_level, d_model=3))
        tail = tail_blocks * b + (1 if b == 32 else 0)
        w_max = tail + (b - 1) * max_level + 1 + slack + (b if b == 32 else 2 * b)
        self.wc = WorkingContext(self.tree, ContextConfig(w_max=w_max, tail_tokens=tail))
        self.alloc = FocusAllocator(AllocatorConfig(n_diff=int(self.rng.integers(1, 6))))
        self.model: list[tuple[int, int, int]] = []
        STEPS["machines"] += 1

    # -------------------------------------------------------------- model updates from actions
    def _model_expand(self, level, index):
        w = self.b**level
        i = self.model.index((index * w, (index + 1) * w, level))
        cw = w // self.b
        kids = [(index * w + k * cw, index * w + (k + 1) * cw, level - 1) for k in range(self.b)]
        self.model[i : i + 1] = kids

    def _model_collapse(self, level, index):
        w = self.b**level
        cw = w // self.b
        i = self.model.index((index * w, index * w + cw, level - 1))
        kids = [(index * w + k * cw, index * w + (k + 1) * cw, level - 1) for k in range(self.b)]
        assert self.model[i : i + self.b] == kids, "collapse of a non-consecutive sibling group"
        assert (index + 1) * w <= self.wc.n_tokens - self.wc.config.tail_tokens, (
            "collapse inside the tail"
        )
        self.model[i : i + self.b] = [(index * w, (index + 1) * w, level)]

    def _apply_to_model(self, actions):
        for a in actions:
            (self._model_expand if a.kind == "expand" else self._model_collapse)(a.level, a.index)

    # ------------------------------------------------------------------------------------ rules
    @rule(k=st.integers(0, 40))
    def ingest(self, k):
        STEPS["rules"] += 1
        k = k if self.b < 32 else k * 8
        self.tree.ingest(self.rng.integers(0, 100, k), self.rng.normal(size=(k, 3)))
        t = self.wc.n_tokens
        need = min_slots(t + k, self.b, self.max_level, self.wc.config.tail_tokens)
        try:
            self.wc.append_tokens(k)
        except BudgetExhausted:
            # Only legitimate when even the coarsest cover does not fit; nothing changed.
            assert need > self.wc.config.w_max
            assert self.wc.n_tokens == t
            return
        assert need <= self.wc.config.w_max
        self.model += [(t + j, t + j + 1, 0) for j in range(k)]
        actions = self.alloc.enforce_budget(self.wc)
        assert all(a.kind == "collapse" for a in actions)
        self._apply_to_model(actions)

    @precondition(lambda self: len(self.wc) > 0)
    @rule(data=st.data(), adversarial=st.booleans())
    def refocus(self, data, adversarial):
        STEPS["rules"] += 1
        scores = data.draw(seeded_score_vectors(len(self.wc)))
        if adversarial:  # push every gist to expand and every group to be free
            scores = np.where(self.wc.levels >= 1, 10.0, 5.0)
        before = len(self.wc)
        actions = self.alloc.step(self.wc, scores)
        assert len(actions) <= self.alloc.config.n_diff
        assert len(self.wc) == before + sum(a.slot_delta for a in actions)
        self._apply_to_model(actions)

    @precondition(lambda self: len(self.wc) > 0)
    @rule(data=st.data(), bad=st.sampled_from([np.nan, np.inf, -np.inf, "shape"]))
    def bad_scores_raise(self, data, bad):
        STEPS["rules"] += 1
        scores = np.zeros(len(self.wc) + (1 if bad == "shape" else 0))
        if bad != "shape":
            scores[data.draw(st.integers(0, len(self.wc) - 1))] = bad
        with pytest.raises(ValueError):
            self.alloc.step(self.wc, scores)

    @precondition(lambda self: bool(np.any(self.wc.levels >= 1)) and self.wc.free_slots() >= 0)
    @rule(data=st.data())
    def expand_directly(self, data):
        STEPS["rules"] += 1
        gists = np.flatnonzero(self.wc.levels >= 1)
        i = int(gists[data.draw(st.integers(0, gists.size - 1))])
        level, index = int(self.wc.levels[i]), int(self.wc.indices[i])
        if self.wc.free_slots() < self.b - 1:
            return  # would break the budget; the allocator is the only way to pay
        self.wc.expand(level, index)
        self._model_expand(level, index)

    @precondition(lambda self: self.wc.group_starts().size > 0)
    @rule(data=st.data())
    def collapse_directly(self, data):
        STEPS["rules"] += 1
        starts = self.wc.group_starts()
        s = int(starts[data.draw(st.integers(0, starts.size - 1))])
        level, index = int(self.wc.levels[s]) + 1, int(self.wc.indices[s]) // self.b
        self.wc.collapse(level, index)
        self._model_collapse(level, index)

    @precondition(lambda self: len(self.wc) > 0)
    @rule(data=st.data())
    def illegal_actions_raise(self, data):
        STEPS["rules"] += 1
        i = data.draw(st.integers(0, len(self.wc) - 1))
        level, index = int(self.wc.levels[i]), int(self.wc.indices[i])
        if level == 0:
            with pytest.raises(IllegalAction):
                self.wc.expand(0, index)
        if self.wc.group_ids()[i] < 0 and level < self.max_level:
            with pytest.raises(IllegalAction):
                self.wc.collapse(level + 1, index // self.b)

    # ------------------------------------------------------------------------------- invariants
    @invariant()
    def matches_model_and_invariants(self):
        self.wc.check_invariants()
        spans = list(
            zip(
                self.wc.starts.tolist(), self.wc.ends.tolist(), self.wc.levels.tolist(), strict=True
            )
        )
        assert spans == self.model
        assert len(self.wc) <= self.wc.config.w_max


# The ci profile must cover >= 10^5 rule steps in total (measured: see the module docstring).
_CI = settings.get_current_profile_name() == "ci"
FocusMachine.TestCase.settings = settings(
    max_examples=1200 if _CI else settings.default.max_examples,
    stateful_step_count=100 if _CI else 50,
)
TestFocusMachine = FocusMachine.TestCase
