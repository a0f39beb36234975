"""Shared hypothesis strategies: trees, working contexts and score vectors (nouns, keyword-only)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from sim.tree import MegaContextTree, TreeConfig
from sim.working_context import ContextConfig, WorkingContext, min_slots


def build_tree(block_size: int, max_level: int, n_tokens: int, d_model: int = 4, seed: int = 0) -> MegaContextTree:
    """A tree holding ``n_tokens`` random tokens (embeddings ~ N(0, 1))."""
    rng = np.random.default_rng(seed)
    tree = MegaContextTree(TreeConfig(block_size=block_size, max_level=max_level, d_model=d_model))
    tree.ingest(rng.integers(0, 1000, n_tokens), rng.normal(size=(n_tokens, d_model)))
    return tree


@st.composite
def tree_shapes(draw, *, max_block: int = 4, allow_b32: bool = True) -> tuple[int, int]:
    """(block_size, max_level): small b (2..max_block) mostly, b = 32 sometimes."""
    b = draw(st.sampled_from([*range(2, max_block + 1), 32] if allow_b32 else list(range(2, max_block + 1))))
    max_level = draw(st.integers(1, 2 if b == 32 else 3))
    return b, max_level


@st.composite
def working_contexts(draw, *, max_tokens: int = 200, n_moves: int = 30) -> WorkingContext:
    """A legal working context reached by random collapses and expands from an all-L0 cover."""
    b, max_level = draw(tree_shapes())
    cap = max_tokens if b < 32 else 32 * 40
    n_tokens = draw(st.integers(1, cap))
    tail = draw(st.integers(0, min(n_tokens, 3 * b)))
    tree = build_tree(b, max_level, n_tokens, seed=draw(st.integers(0, 2**16)))
    roomy = WorkingContext(tree, ContextConfig(w_max=n_tokens + tail + b * max_level + 1, tail=tail))
    roomy.append_tokens(n_tokens)
    for _ in range(draw(st.integers(0, n_moves))):
        starts = roomy.group_starts()
        gists = np.flatnonzero(roomy.levels >= 1)
        if draw(st.booleans()) and starts.size:
            s = int(starts[draw(st.integers(0, starts.size - 1))])
            roomy.collapse(int(roomy.levels[s]) + 1, int(roomy.indices[s]) // b)
        elif gists.size:
            i = int(gists[draw(st.integers(0, gists.size - 1))])
            roomy.expand(int(roomy.levels[i]), int(roomy.indices[i]))
    floor = tail + (b - 1) * max_level + 1
    slack = draw(st.integers(0, 2 * b))
    mode = draw(st.sampled_from(["slot", "centre"]))
    wc = WorkingContext(tree, ContextConfig(w_max=max(len(roomy), floor) + slack, tail=tail, position_mode=mode))
    wc.levels, wc.indices, wc.n_tokens = roomy.levels.copy(), roomy.indices.copy(), roomy.n_tokens
    assert min_slots(n_tokens, b, max_level, tail) <= len(wc)
    return wc


@st.composite
def score_vectors(draw, n: int, *, scale: float = 3.0) -> np.ndarray:
    """One finite signed score per entry, with ties, zeros and values near the thresholds."""
    pool = st.one_of(
        st.floats(-scale, scale, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 0.2, -0.2, 0.21, 1.0, -1.0]),
    )
    return np.array(draw(st.lists(pool, min_size=n, max_size=n)), dtype=np.float64)
