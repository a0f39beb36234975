"""MegaContext tree: spans, completion rule, append-only gists, reference against a naive build."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megacontext.tree import ConfigError, MegaContextTree, TreeConfig, mean_gister
from tests.strategies import tree_shapes


def naive_gists(emb: np.ndarray, b: int, max_level: int) -> list[np.ndarray]:
    """Reference: levels built from scratch, one node at a time."""
    levels = [emb]
    for _ in range(max_level):
        below = levels[-1]
        n = below.shape[0] // b
        levels.append(
            np.stack([below[i * b : (i + 1) * b].mean(0) for i in range(n)]) if n else below[:0]
        )
    return levels


@given(
    shape=tree_shapes(allow_b32=False), chunks=st.lists(st.integers(0, 40), min_size=1, max_size=12)
)
def test_chunked_ingest_matches_naive_build(shape, chunks):
    b, max_level = shape
    rng = np.random.default_rng(0)
    tree = MegaContextTree(
        TreeConfig(block_size=b, max_level=max_level, d_model=3), dtype=np.float64
    )
    total = sum(chunks)
    emb = rng.normal(size=(total, 3))
    ids = rng.integers(0, 50, total)
    snapshots = []
    pos = 0
    for c in chunks:
        tree.ingest(ids[pos : pos + c], emb[pos : pos + c])
        pos += c
        snapshots.append([tree.embeddings(lv).copy() for lv in range(max_level + 1)])
    ref = naive_gists(emb, b, max_level)
    for lv in range(max_level + 1):
        assert tree.n_nodes(lv) == total // b**lv
        np.testing.assert_allclose(tree.embeddings(lv), ref[lv], atol=1e-12)
    # append-only: every earlier snapshot is a prefix of the final arrays
    for snap in snapshots:
        for lv, arr in enumerate(snap):
            np.testing.assert_array_equal(tree.embeddings(lv)[: arr.shape[0]], arr)
    np.testing.assert_array_equal(tree.token_ids(), ids)


def test_spans_parent_children_b32():
    tree = MegaContextTree(TreeConfig(block_size=32, max_level=2, d_model=2))
    tree.ingest(np.arange(2048), np.zeros((2048, 2)))
    assert tree.span(2, 1) == (1024, 2048)
    assert tree.span(1, 3) == (96, 128)
    assert tree.parent(0, 95) == (1, 2)
    lv, kids = tree.children(2, 1)
    assert lv == 1 and kids[0] == 32 and kids[-1] == 63
    assert tree.exists(2, 1) and not tree.exists(2, 2) and not tree.exists(3, 0)
    with pytest.raises(ValueError, match="no parent"):
        tree.parent(2, 0)
    with pytest.raises(ValueError, match="no children"):
        tree.children(0, 5)


def test_partial_block_has_no_gist():
    tree = MegaContextTree(TreeConfig(block_size=4, max_level=2, d_model=2))
    tree.ingest(np.arange(15), np.ones((15, 2)))
    assert (tree.n_nodes(0), tree.n_nodes(1), tree.n_nodes(2)) == (15, 3, 0)
    tree.ingest(np.arange(1), np.ones((1, 2)))
    assert (tree.n_nodes(1), tree.n_nodes(2)) == (4, 1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="block_size"):
        TreeConfig(block_size=1)
    with pytest.raises(ConfigError, match="max_level"):
        TreeConfig(max_level=0)
    tree = MegaContextTree(TreeConfig(block_size=2, max_level=1, d_model=3))
    with pytest.raises(ValueError, match="shape"):
        tree.ingest(np.arange(4), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        tree.ingest(np.arange(2), np.full((2, 3), np.nan))
    bad = MegaContextTree(
        TreeConfig(block_size=2, max_level=1, d_model=3), gister=lambda c, lv: c[:, 0, :2]
    )
    with pytest.raises(ValueError, match="gister returned shape"):
        bad.ingest(np.arange(2), np.zeros((2, 3)))


def test_pluggable_gister_gets_level_and_children():
    seen = []

    def gister(children, level):
        seen.append((children.shape, level))
        return mean_gister(children, level) + level

    tree = MegaContextTree(
        TreeConfig(block_size=2, max_level=2, d_model=1), gister=gister, dtype=np.float64
    )
    tree.ingest(np.arange(4), np.arange(4, dtype=float)[:, None])
    assert seen == [((2, 2, 1), 1), ((1, 2, 1), 2)]
    np.testing.assert_allclose(tree.embeddings(1)[:, 0], [1.5, 3.5])
    np.testing.assert_allclose(tree.embeddings(2)[:, 0], [2.5 + 2])
