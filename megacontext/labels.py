"""Counterfactual labels (DESIGN.md §3): for one snapshot, the NLL change of every legal action.

Every oracle implements ``megacontext.oracle.NLLOracle`` (synthetic world, real LM).
``label_snapshot`` evaluates the baseline context, every single expand and every sibling-group
collapse (each ignoring the budget, one action at a time), and returns the trace record: gains g,
costs c, the signed target ``y = g [can expand] - c [group can collapse]``, the action mask, the
exact slot costs the allocator uses (c+ = b - 1, c- = (b - 1) / b), and LensNet's input features
with the tail gists. Writing labelled traces over documents is ``sim.labels``.
"""

from __future__ import annotations

import numpy as np

from megacontext.oracle import NLLOracle
from megacontext.working_context import ContextArrays, WorkingContext


def counterfactual_contexts(
    wc: WorkingContext, n_tail_gists: int = 6, expand_slots: np.ndarray | None = None
) -> tuple[ContextArrays, list[tuple[str, int, ContextArrays]]]:
    """The baseline arrays and, per legal action, (kind, slot, arrays of the context after it).

    ``slot`` is the expanded entry, or the first member of the collapsed group. ``expand_slots``:
    only these entries' expands (every collapse still).
    """
    base = wc.arrays(n_tail_gists)
    b = wc.block_size
    variants: list[tuple[str, int, ContextArrays]] = []
    expandable = np.flatnonzero(base.can_expand)
    if expand_slots is not None:
        expandable = np.intersect1d(expandable, np.asarray(expand_slots, dtype=np.int64))
    for i in expandable:
        v = wc.copy()
        v.expand(int(base.levels[i]), int(base.node_index[i]))
        variants.append(("expand", int(i), v.arrays(n_tail_gists)))
    for s in np.unique(base.group_id[base.group_id >= 0]):
        v = wc.copy()
        v.collapse(int(base.levels[s]) + 1, int(base.node_index[s]) // b)
        variants.append(("collapse", int(s), v.arrays(n_tail_gists)))
    return base, variants


def lookahead_contexts(
    wc: WorkingContext, n_tail_gists: int = 6, children: dict[int, list[int]] | None = None
) -> list[tuple[int, ContextArrays]]:
    """Per gist of level >= 2 and per child: (slot, arrays after expanding the gist and then that
    child).

    The lookahead label of a level >= 2 gist is the best of these two-step expansions (DESIGN §3):
    a single expand leaves the child a gist, so its gain is blind to detail two levels down.
    ``children``: only these gists (slot -> the child node indices to try).
    """
    b = wc.block_size
    out: list[tuple[int, ContextArrays]] = []
    slots = np.flatnonzero(wc.levels >= 2)
    if children is not None:
        slots = [i for i in slots if int(i) in children]
    for i in slots:
        level, index = int(wc.levels[i]), int(wc.indices[i])
        tried = range(index * b, (index + 1) * b) if children is None else children[int(i)]
        for child in tried:
            v = wc.copy()
            v.expand(level, index)
            v.expand(level - 1, child)
            out.append((int(i), v.arrays(n_tail_gists)))
    return out


def label_snapshot(
    wc: WorkingContext,
    oracle: NLLOracle,
    query_ids: np.ndarray,
    query_start: int,
    n_tail_gists: int = 6,
    doc_id: int = 0,
    lookahead: bool = False,
    expand_slots: np.ndarray | None = None,
    children: dict[int, list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """A labelled snapshot in the trace format (``megacontext.traces.ENTRY_KEYS`` +
    ``SNAPSHOT_KEYS``).

    ``lookahead``: the expand gain of a gist of level >= 2 is max(its single-expand gain, the best
    gain of expanding it and then one of its children) — see ``lookahead_contexts``.
    ``expand_slots`` / ``children``: label only these expands (and, with ``lookahead``, only these
    children of the level >= 2 ones); every other expand gain is 0 (a partial label: exact where
    computed). Collapses are all labelled.
    """
    if query_start != wc.n_tokens:
        raise ValueError(
            f"the query must start at the cursor: query_start={query_start}, T={wc.n_tokens}"
        )
    if oracle.d_model != wc.tree.config.d_model:
        raise ValueError(
            f"oracle d_model {oracle.d_model} != tree d_model {wc.tree.config.d_model}"
        )
    base, variants = counterfactual_contexts(wc, n_tail_gists, expand_slots)
    if lookahead and expand_slots is not None and children is None:
        children = {}  # partial: no lookahead unless its children are named
    deep = lookahead_contexts(wc, n_tail_gists, children) if lookahead else []
    nll = np.asarray(
        oracle.nll(
            [base, *(v for _, _, v in variants), *(v for _, v in deep)], query_ids, query_start
        ),
        dtype=np.float64,
    )
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError(f"oracle returned non-finite NLL {nll[~np.isfinite(nll)][:4]}")
    b = wc.block_size
    n = len(wc)
    gain = np.zeros(n)
    cost = np.zeros(n)
    for (kind, slot, _), value in zip(variants, nll[1 : 1 + len(variants)], strict=True):
        if kind == "expand":
            gain[slot] = max(0.0, nll[0] - value)
        else:
            cost[slot : slot + b] = max(0.0, value - nll[0])
    for (slot, _), value in zip(deep, nll[1 + len(variants) :], strict=True):
        gain[slot] = max(gain[slot], nll[0] - value)
    return snapshot_record(base, wc.n_tokens, gain, cost, doc_id, nll[0])


def target_utility(gain, cost, can_expand, can_collapse) -> np.ndarray:
    """The signed label LensNet learns (DESIGN §5), its one home: gain x can_expand - cost x
    can_collapse per entry (an entry that can do neither gets 0)."""
    return np.where(can_expand, gain, 0.0) - np.where(can_collapse, cost, 0.0)


def snapshot_record(
    base: ContextArrays,
    n_tokens: int,
    gain: np.ndarray,
    cost: np.ndarray,
    doc_id: int = 0,
    baseline_nll: float = np.nan,
) -> dict[str, np.ndarray]:
    """A trace snapshot (``megacontext.traces.ENTRY_KEYS`` + ``SNAPSHOT_KEYS``) from a context's
    arrays and its labels: per entry the expand gain and collapse cost, the target utility
    gain x can_expand - cost x can_collapse, the action mask."""
    target = target_utility(gain, cost, base.can_expand, base.can_collapse)
    return {
        "embeddings": base.embeddings.astype(np.float32),
        "levels": base.levels,
        "node_index": base.node_index,
        "span_start": base.span_start,
        "span_width": base.span_width,
        "distance_to_cursor": base.distance_to_cursor,
        "position_ids": base.position_ids,
        "can_expand": base.can_expand,
        "can_collapse": base.can_collapse,
        "group_id": base.group_id,
        "expand_cost": base.expand_cost,
        "collapse_refund": base.collapse_refund,
        "expand_gain": np.asarray(gain, np.float32),
        "collapse_cost": np.asarray(cost, np.float32),
        "target_utilities": target.astype(np.float32),
        "action_mask": base.can_expand | base.can_collapse,
        "tail_gists": base.tail_gists.astype(np.float32),
        "tail_levels": base.tail_levels,
        "tail_mask": base.tail_mask,
        "n_tokens": np.int64(n_tokens),
        "baseline_nll": np.float32(baseline_nll),
        "doc_id": np.int64(doc_id),
    }
