"""The focus allocator (DESIGN.md §4): turns one signed score per entry into legal, budgeted
actions.

Positive score = expand this gist (what detail would gain), negative = what collapsing its
sibling group would cost. ``step`` is the one refocus pass of a step: the context it gets may be
over budget (the cursor has just ingested K tokens), so it first restores W_max by collapsing the
groups the scores value least (forced collapses: no cooldown, not counted in ``n_diff``), then
hard-masks illegal directions (``mask_illegal``, shared with LensNet so there is one copy),
expands the best candidates above ``tau_expand``, pays for expands that do not fit with the
cheapest non-overlapping sibling groups that hold no expand candidate when the swap is worth it,
applies at most ``n_diff`` chosen actions and refuses to reverse a node a chosen action touched
within ``cooldown`` steps.
No restore ever drops history: with no legal collapse left it raises ``BudgetExhausted``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from megacontext.tree import ConfigError
from megacontext.working_context import BudgetExhausted, InvariantViolation, WorkingContext

ArrayT = TypeVar("ArrayT")


def mask_illegal(scores: ArrayT, can_expand: ArrayT, can_collapse: ArrayT) -> ArrayT:
    """Zero the illegal direction of each score: u>0 where it cannot expand, u<0 where it cannot
    collapse.

    Works unchanged on numpy arrays and torch tensors (LensNet uses it at inference).
    """
    legal = ((scores > 0) & can_expand) | ((scores < 0) & can_collapse)
    return scores * legal


@dataclass(frozen=True)
class AllocatorConfig:
    """Thresholds of the focus allocator (DESIGN §4)."""

    tau_expand: float = 0.2
    """Expand candidates need a (masked) score above this."""
    tau_swap: float = 0.0
    """A paid expand happens only if u_expand + sum of the paying groups' mean scores exceeds this.
    """
    n_diff: int = 4
    """At most this many actions (expands + collapses) per step."""
    cooldown: int = 2
    """A node expanded/collapsed within this many steps may not be reversed."""

    def __post_init__(self) -> None:
        if self.n_diff < 1:
            raise ConfigError(f"n_diff must be >= 1, got {self.n_diff}")
        if self.cooldown < 0:
            raise ConfigError(f"cooldown must be >= 0, got {self.cooldown}")
        if not (np.isfinite(self.tau_expand) and np.isfinite(self.tau_swap)):
            raise ConfigError("tau_expand and tau_swap must be finite")
        if self.tau_expand < 0:
            raise ConfigError(f"tau_expand must be >= 0, got {self.tau_expand}")


@dataclass(frozen=True)
class Action:
    """One applied change. ``level``/``index`` name the gist expanded or the parent collapsed into.
    """

    kind: Literal["expand", "collapse"]
    level: int
    index: int
    slot_delta: int
    forced: bool = False
    """A budget-restore collapse after ingest: not a choice, so no cooldown and not in ``n_diff``.
    """


class FocusAllocator:
    """Stateful (for the cooldown) applier of scores to a ``WorkingContext``."""

    def __init__(self, config: AllocatorConfig | None = None) -> None:
        self.config = config or AllocatorConfig()
        self.step_count = 0
        # node (level, index) -> (step, kind) of its last expand / collapse-into
        self._touched: dict[tuple[int, int], tuple[int, str]] = {}

    def _cooling(self, key: tuple[int, int], reverse_of: str, step: int) -> bool:
        last = self._touched.get(key)
        return last is not None and last[1] == reverse_of and step - last[0] <= self.config.cooldown

    def _validate(self, wc: WorkingContext, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(wc),):
            raise ValueError(
                f"scores must have shape ({len(wc)},) (one per entry), got {scores.shape}"
            )
        if not np.all(np.isfinite(scores)):
            bad = np.flatnonzero(~np.isfinite(scores))
            raise ValueError(f"scores must be finite; NaN/inf at slots {bad[:8].tolist()}")
        return scores

    # --------------------------------------------------------------------------- refocus step
    def step(self, wc: WorkingContext, scores: np.ndarray) -> list[Action]:
        """One refocus pass with one score vector (one per entry of the possibly over-budget
        ``wc``).

        First the budget is restored by collapsing the groups ``scores`` value least (forced
        actions: not counted in ``n_diff``, no cooldown), then the best expands/swaps are applied.
        Returns every action in the order applied. Long by design: DESIGN §4's pass in one place,
        its phases sharing the budget being spent.
        """
        scores = self._validate(wc, scores)
        self.step_count += 1
        step, cfg, b = self.step_count, self.config, wc.block_size
        u = mask_illegal(scores, wc.can_expand(), wc.can_collapse())
        actions, u, touched = self._restore(wc, u, step)  # touched: token spans changed this step
        levels, indices, starts, ends = wc.levels, wc.indices, wc.starts, wc.ends
        group_starts = wc.group_starts()

        # Collapse candidates: legal groups not reversing a recent expand, cheapest (highest mean)
        # first.
        g_mean = (
            u[group_starts[:, None] + np.arange(b)].mean(axis=1)
            if group_starts.size
            else np.zeros(0)
        )
        g_parent = [(int(levels[s]) + 1, int(indices[s]) // b) for s in group_starts]
        g_ok = np.array([not self._cooling(p, "expand", step) for p in g_parent], dtype=bool)
        # A group holding an expand candidate never pays: its positive member raises the mean, yet
        # collapsing it gives up the very detail the scores ask for (a zoom would collapse the
        # needle's own L1 group to pay for its neighbour's expand).
        if group_starts.size:
            g_ok &= ~np.any(u[group_starts[:, None] + np.arange(b)] > cfg.tau_expand, axis=1)
        g_order = [int(g) for g in np.argsort(-g_mean, kind="stable") if g_ok[g]]

        expand_order = np.flatnonzero(u > cfg.tau_expand)
        expand_order = expand_order[np.argsort(-u[expand_order], kind="stable")]

        def free(lo: int, hi: int) -> bool:
            return all(hi <= t0 or lo >= t1 for t0, t1 in touched)

        n_chosen = 0
        n_slots = len(wc)
        for i in expand_order:
            if n_chosen >= cfg.n_diff:
                break
            key = (int(levels[i]), int(indices[i]))
            lo, hi = int(starts[i]), int(ends[i])
            if self._cooling(key, "collapse", step) or not free(lo, hi):
                continue
            deficit = n_slots + (b - 1) - wc.config.w_max
            pay: list[int] = []
            if deficit > 0:
                n_pay = -(-deficit // (b - 1))
                if n_chosen + 1 + n_pay > cfg.n_diff:
                    continue
                for g in g_order:
                    s = group_starts[g]
                    g_lo, g_hi = int(starts[s]), int(ends[s + b - 1])
                    if (g_hi <= lo or g_lo >= hi) and free(g_lo, g_hi):
                        pay.append(g)
                        if len(pay) == n_pay:
                            break
                if len(pay) < n_pay or u[i] + g_mean[pay].sum() <= cfg.tau_swap:
                    continue
            for g in pay:
                s = group_starts[g]
                parent = g_parent[g]
                n_slots += wc.collapse(*parent)
                actions.append(Action("collapse", parent[0], parent[1], -(b - 1)))
                self._touched[parent] = (step, "collapse")
                touched.append((int(starts[s]), int(ends[s + b - 1])))
            n_slots += wc.expand(*key)
            actions.append(Action("expand", key[0], key[1], b - 1))
            self._touched[key] = (step, "expand")
            touched.append((lo, hi))
            n_chosen += 1 + len(pay)
        if (
            not n_slots == len(wc) <= wc.config.w_max
        ):  # a guarantee, so an error (not an assert) if broken
            raise InvariantViolation(
                "budget",
                f"allocator left {len(wc)} entries (tracked {n_slots}) for w_max={wc.config.w_max}",
            )
        return actions

    # ---------------------------------------------------------------------- budget restore
    def _restore(
        self, wc: WorkingContext, u: np.ndarray, step: int
    ) -> tuple[list[Action], np.ndarray, list[tuple[int, int]]]:
        """Collapse the groups ``u`` values least (highest mean) until ``len(wc) <= W_max``.

        Forced collapses enter no cooldown: they are not choices, and a cooldown would block the
        policy from re-expanding what the restore took (DESIGN §4). Groups reversing a recent
        deliberate expand go last; ties go oldest first. Returns (actions, ``u`` re-indexed to the
        new entries, each collapsed parent taking its members' mean, token spans collapsed).
        """
        b = wc.block_size
        actions: list[Action] = []
        spans: list[tuple[int, int]] = []
        while len(wc) > wc.config.w_max:
            group_starts = wc.group_starts()
            if group_starts.size == 0:
                raise BudgetExhausted(
                    f"{len(wc)} entries exceed w_max={wc.config.w_max} at T={wc.n_tokens} and no "
                    "legal "
                    "collapse is left: raise w_max, shorten the tail, or add a level"
                )
            mean = u[group_starts[:, None] + np.arange(b)].mean(axis=1)
            parents = [(int(wc.levels[s]) + 1, int(wc.indices[s]) // b) for s in group_starts]
            cooling = np.array([self._cooling(p, "expand", step) for p in parents])
            members = u[group_starts[:, None] + np.arange(b)]
            wanted = np.any(members > self.config.tau_expand, axis=1)
            # last key is primary: groups reversing a recent expand, then groups holding an expand
            # candidate (their positive member raises the mean), go last
            order = np.lexsort((group_starts, -mean, wanted, cooling))
            n_need = -(-(len(wc) - wc.config.w_max) // (b - 1))
            # apply right to left so earlier slots (and the ``u`` rows) keep their positions
            for g in sorted(order[:n_need].tolist(), key=lambda g: -group_starts[g]):
                s = int(group_starts[g])
                spans.append((int(wc.starts[s]), int(wc.ends[s + b - 1])))
                wc.collapse(*parents[g])
                u = np.concatenate([u[:s], [u[s : s + b].mean()], u[s + b :]])
                actions.append(
                    Action("collapse", parents[g][0], parents[g][1], -(b - 1), forced=True)
                )
        return actions, u, spans

    def enforce_budget(self, wc: WorkingContext, scores: np.ndarray | None = None) -> list[Action]:
        """Only the restore half of ``step`` (no expands, no step counted): collapse the cheapest
        legal groups until ``len(wc) <= W_max``.

        Cheapest = highest mean (masked) score when ``scores`` (one per current entry) are given,
        else the oldest group (what ``recency_scores`` gives). Raises ``BudgetExhausted`` when no
        legal collapse is left and the budget still breaks.
        """
        u = recency_scores(wc) if scores is None else self._validate(wc, scores)
        u = mask_illegal(u, wc.can_expand(), wc.group_ids() >= 0)
        return self._restore(wc, u, self.step_count + 1)[0]


def recency_scores(wc: WorkingContext) -> np.ndarray:
    """Scores of the recency policy: no expands, and the older a group the cheaper its collapse.

    u = -1 / (1 + distance to the cursor): every score is negative (nothing expands) and a group
    wholly older than another has a higher (cheaper) mean, so restores take the oldest first.
    """
    return recency_scores_of(wc.n_tokens, wc.ends)


def recency_scores_of(n_tokens: int, ends: np.ndarray) -> np.ndarray:
    """``recency_scores`` from the cursor and the entries' span ends (for arrays without their
    working context, e.g. an observation)."""
    return -1.0 / (1.0 + (n_tokens - np.asarray(ends)).astype(np.float64))
