"""Real-LM oracle: next-token alignment against a plain forward, and fast path == naive recompute.
"""

import numpy as np
import pytest
import torch

from megacontext.allocator import FocusAllocator
from megacontext.labels import counterfactual_contexts, label_snapshot
from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from megacontext.tree import MegaContextTree, TreeConfig
from megacontext.working_context import ContextConfig, WorkingContext


def plain_nll(model, ids: np.ndarray, t: int, h: int) -> float:
    """Reference: the LM on raw input ids; mean CE of tokens t..t+h-1 from the logits before them.
    """
    x = torch.as_tensor(ids[: t + h])[None]
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[t - 1 : t + h - 1], x[0, t : t + h]).item()


def focused_context(oracle, ids, t, b=4, w_max=40, tail_tokens=8, mode="slot", seed=0, moves=6):
    tree = MegaContextTree(TreeConfig(block_size=b, max_level=2, d_model=oracle.d_model))
    tree.ingest(ids[:t], oracle.token_embeddings(ids[:t]))
    wc = WorkingContext(
        tree, ContextConfig(w_max=w_max, tail_tokens=tail_tokens, position_mode=mode)
    )
    wc.append_tokens(t)
    alloc = FocusAllocator()
    alloc.enforce_budget(wc)
    rng = np.random.default_rng(seed)
    for _ in range(moves):
        alloc.step(wc, rng.normal(size=len(wc)))
    wc.check_invariants()
    return wc


@pytest.mark.parametrize("mode", ["slot", "centre"])
def test_all_l0_context_equals_plain_forward(mode):
    model = tiny_llama()
    oracle = LMOracle(model)
    ids = np.random.default_rng(0).integers(0, 512, 80)
    t, h = 48, 16
    tree = MegaContextTree(TreeConfig(block_size=4, max_level=2, d_model=oracle.d_model))
    tree.ingest(ids[:t], oracle.token_embeddings(ids[:t]))
    wc = WorkingContext(tree, ContextConfig(w_max=64, tail_tokens=8, position_mode=mode))
    wc.append_tokens(t)
    got = oracle.nll([wc.arrays()], ids[t : t + h], t)[0]
    assert got == pytest.approx(plain_nll(model, ids, t, h), abs=1e-5)
    oracle.fast = False
    assert oracle.nll([wc.arrays()], ids[t : t + h], t)[0] == pytest.approx(
        plain_nll(model, ids, t, h), abs=1e-5
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["slot", "centre"])
def test_fast_path_equals_naive_recompute(seed, mode):
    model = tiny_llama(seed=seed)
    fast, naive = LMOracle(model, batch_size=5), LMOracle(model, batch_size=7, fast=False)
    ids = np.random.default_rng(seed).integers(0, 512, 200)
    t, h = 160, 16
    wc = focused_context(fast, ids, t, seed=seed, mode=mode)
    base, variants = counterfactual_contexts(wc, 3)
    ctxs = [base, *(v for _, _, v in variants)]
    assert len(ctxs) > 5
    a = fast.nll(ctxs, ids[t : t + h], t)
    b = naive.nll(ctxs, ids[t : t + h], t)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert fast.positions_recomputed < naive.positions_recomputed
    snap = label_snapshot(
        wc, fast, ids[t : t + h], t, 3
    )  # the labeller over the LM runs end to end
    assert np.isfinite(snap["target_utilities"]).all() and snap["baseline_nll"] == pytest.approx(
        a[0], abs=1e-5
    )


def test_bad_contexts_raise():
    oracle = LMOracle(tiny_llama())
    wc = focused_context(oracle, np.arange(40) % 512, 32, moves=0)
    arr = wc.arrays()
    arr.embeddings = arr.embeddings[:, :10]
    with pytest.raises(ValueError, match="d_model"):
        oracle.nll([arr], np.arange(4), 32)


@pytest.fixture(scope="module")
def smollm2():
    from megacontext.lm import load_lm

    model, tok = load_lm("smollm2", device="cpu")
    return model, tok


def pydoc_ids(tok, n: int) -> np.ndarray:
    import pydoc_data.topics as topics

    text = topics.topics["assert"] + topics.topics["assignment"]
    return np.asarray(tok(text).input_ids[:n])


@pytest.mark.real_lm
def test_smollm2_alignment_and_fast_path(smollm2):
    """The real LM (kept small for CI): all-L0 == plain forward; fast == naive on counterfactuals.
    """
    model, tok = smollm2
    oracle = LMOracle(model)
    assert oracle.d_model == 576
    ids = pydoc_ids(tok, 128)
    t, h = 96, 16
    wc = focused_context(oracle, ids, t, b=8, w_max=64, tail_tokens=16, moves=0)
    roomy = WorkingContext(wc.tree, ContextConfig(w_max=t, tail_tokens=16))
    roomy.append_tokens(t)
    # 1e-4 here (1e-5 with the tiny LM): the oracle runs the 49k-wide output head on the H query
    # rows
    # only, and fp32 GEMM over 16 rows vs 112 rows accumulates in a different order (differences
    # just under 1e-4).
    assert oracle.nll([roomy.arrays()], ids[t : t + h], t)[0] == pytest.approx(
        plain_nll(model, ids, t, h), abs=1e-4
    )
    base, variants = counterfactual_contexts(wc, 3)
    ctxs = [base, *(v for _, _, v in variants)][:12]
    fast = oracle.nll(ctxs, ids[t : t + h], t)
    naive = LMOracle(model, fast=False).nll(ctxs, ids[t : t + h], t)
    np.testing.assert_allclose(fast, naive, atol=1e-4)


def test_lookahead_labels_equal_brute_force():
    """Lookahead expand gain of an L2 gist = max(single expand, best expand-then-child), recomputed
    here one context at a time with the naive oracle; L1 gains and collapse costs are unchanged."""
    model = tiny_llama()
    fast, naive = LMOracle(model, batch_size=5), LMOracle(model, fast=False)
    b, t, h = 3, 60, 4
    ids = np.random.default_rng(3).integers(0, 512, t + h)
    tree = MegaContextTree(TreeConfig(block_size=b, max_level=2, d_model=fast.d_model))
    tree.ingest(ids[:t], fast.token_embeddings(ids[:t]))
    wc = WorkingContext(tree, ContextConfig(w_max=16, tail_tokens=6))
    wc.append_tokens(t)
    FocusAllocator().enforce_budget(wc)
    assert np.any(wc.levels == 2)
    plain = label_snapshot(wc, fast, ids[t : t + h], t, n_tail_gists=2)
    deep = label_snapshot(wc, fast, ids[t : t + h], t, n_tail_gists=2, lookahead=True)
    base = naive.nll([wc.arrays(2)], ids[t : t + h], t)[0]
    for i in range(len(wc)):
        level, index = int(wc.levels[i]), int(wc.indices[i])
        if level < 2:
            assert deep["expand_gain"][i] == pytest.approx(plain["expand_gain"][i], abs=1e-6)
            continue
        best = plain["expand_gain"][i]
        for child in range(index * b, (index + 1) * b):  # brute force: every two-step expansion
            v = wc.copy()
            v.expand(level, index)
            v.expand(level - 1, child)
            best = max(best, base - naive.nll([v.arrays(2)], ids[t : t + h], t)[0])
        assert deep["expand_gain"][i] == pytest.approx(best, abs=1e-4)
    np.testing.assert_allclose(deep["collapse_cost"], plain["collapse_cost"], atol=1e-6)


def test_no_forward_may_ask_for_a_position_past_the_lms_window():
    """An LMOracle guards its model: explicit position ids, implicit ones, and implicit ones after a
    cached prefix all raise a PositionError at the LM's max_position_embeddings, and pass below."""
    import torch

    from megacontext.lm import tiny_llama
    from megacontext.lm_oracle import LMOracle, PositionError

    model = tiny_llama()
    model.config.max_position_embeddings = 64
    LMOracle(model)
    LMOracle(model)  # installed once
    x = torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=x, position_ids=torch.arange(56, 64)[None])  # the last legal position: 63
        with pytest.raises(PositionError, match="position 64"):
            model(input_ids=x, position_ids=torch.arange(57, 65)[None])
        model(input_ids=torch.zeros(1, 64, dtype=torch.long))
        with pytest.raises(PositionError, match="position 64"):
            model(input_ids=torch.zeros(1, 65, dtype=torch.long))
        out = model(input_ids=torch.zeros(1, 60, dtype=torch.long), use_cache=True)
        with pytest.raises(PositionError, match="position 64"):
            model(input_ids=x[:, :5], past_key_values=out.past_key_values, use_cache=True)
    assert len(model.base_model._forward_pre_hooks) == 1
