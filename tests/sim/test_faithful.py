"""The faithful read (DESIGN §11, issue 28 item 1): question-time decisions read only what the
deployed system computed while it ran. Three properties: (a) the raw tokens of a block that is a
gist at question time reach no decision input (the full read breaks it: its query reads them);
(b) a block's stored keys do not depend on later tokens; (c) with an unbounded working context the
faithful store is the full read (and with a compressing one it is not). Plus: the sink is token 0
everywhere (a needle in block 0 is found and labelled), and the query is exactly the question."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lensnet.model import LensNet, LensNetConfig
from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError, MegaContextTree, TreeConfig
from sim.policies import Attention, LensNetPolicy
from sim.policy import FocusView
from sim.tasklabels import cheap_targets
from sim.taskworld.features import QueryTooLong, answer_relevance, lensnet_item
from sim.taskworld.world import (
    CharTokenizer,
    TaskWorldConfig,
    keystore,
    prepare_task,
    query_span,
    stream_cover,
    zoom,
)
from tests.sim.test_taskworld import WORLD, _task

TOK = CharTokenizer(512)
FAITHFUL = replace(WORLD, read_mode="faithful")
FULL = replace(WORLD, read_mode="full-read")


@pytest.fixture(scope="module")
def oracle():
    return LMOracle(tiny_llama())


def _gist_block(pt) -> tuple[int, int]:
    """(start, end) of a complete L1 block that stands under a gist in the question-time cover."""
    wc, b = pt.wc, pt.wc.block_size
    for i in np.flatnonzero(wc.levels >= 1):
        s = int(wc.starts[i])
        if s >= b:  # not the sink's block: any token of it may change
            return s, s + b
    raise AssertionError("the question-time cover holds no gist")


def _with_tokens_replaced(pt, start: int, end: int):
    """``pt``'s tree with the raw tokens [start, end) replaced (other L0 embeddings), its gists
    and everything else kept: what the LM never reads again once the block is a gist."""
    tree = pt.wc.tree
    rows = tree._levels[0].view  # (n, d) L0 embeddings, the tree's own storage
    rows[start:end] = np.roll(rows[start:end], 1, axis=1) + 0.5
    ids = tree._token_ids.view
    ids[start:end] = (ids[start:end] + 1) % 512
    pt.ids = pt.ids.copy()
    pt.ids[start:end] = ids[start:end]


def _lens(oracle, n_layers: int) -> LensNet:
    torch.manual_seed(0)
    cfg = LensNetConfig(
        d_model=oracle.d_model, d_lens=16, n_heads=2, n_stacks=1, max_level=2, block_size=4,
        n_query_tokens=8, n_entry_features=keystore.n_entry_features(n_layers),
    )
    return LensNet(cfg)


def test_a_gist_blocks_raw_tokens_reach_no_decision_input(oracle):
    """(a) Replacing the raw tokens of a block that is a gist at question time, keeping its gist and
    its stored keys, changes no question-time query, attention feature, attention-baseline score
    or LensNet score, in any zoom round. The full read, given the same change, does move them."""
    pt = prepare_task(_task(n_filler=300), oracle, TOK, FAITHFUL, features=False, attention=True)
    assert pt.read_mode == "faithful"
    n_layers = oracle.model.config.num_hidden_layers
    lens = LensNetPolicy(_lens(oracle, n_layers))
    attention = Attention()

    def decisions(task):
        view = FocusView(task.wc, FAITHFUL.n_tail_gists, oracle, task.answer_ids, True, task,
                         FAITHFUL.attention_window)
        wc, _ = zoom(attention, task, FAITHFUL, oracle)  # a second round's context too
        assert not np.array_equal(wc.levels, task.wc.levels)  # the zoom did open something
        return (
            task.question_attention(task.wc, oracle).copy(),
            attention.scores(view),
            lens.scores(view),
            task.question_attention(wc, oracle).copy(),
        )

    before = decisions(pt)
    start, end = _gist_block(pt)
    # the same stored keys and gists; every question-time input recomputed from them (no stored
    # probabilities, no cached queries)
    fresh = replace(pt, _attention={}, attention_probs=None)
    assert fresh.stream_keys is pt.stream_keys
    _with_tokens_replaced(fresh, start, end)
    after = decisions(fresh)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)

    # the full read reads those tokens: the question's query moves with them, so its attention
    # moves even on the tokens before the block, whose keys are the same causal function
    full = keystore.read(oracle, pt.ids, 4).probs(-1)
    moved = keystore.read(oracle, fresh.ids, 4).probs(-1)
    assert np.abs(full - moved)[..., :start].max() > 1e-5  # 10x the tolerance above


def test_a_blocks_stored_keys_do_not_depend_on_later_tokens(oracle):
    """(b) Changing any token after a block leaves that block's stored keys as they were."""
    a = _task(n_filler=300)
    b = dict(a, context=a["context"][:200] + "zzzzqqqq" + a["context"][208:])
    pa = prepare_task(a, oracle, TOK, FAITHFUL, features=False, attention=True)
    pb = prepare_task(b, oracle, TOK, FAITHFUL, features=False, attention=True)
    first = int(np.flatnonzero(pa.ids != pb.ids)[0])
    assert 150 < first < pa.n_tokens - 40
    for ka, kb in zip(pa.stream_keys, pb.stream_keys, strict=True):
        np.testing.assert_allclose(ka[:, :first].numpy(), kb[:, :first].numpy(), atol=1e-6)
        assert not np.allclose(ka[:, first:].numpy(), kb[:, first:].numpy(), atol=1e-4)
    # the full read's keys are the same causal function; what differs is its query (test (a))


def test_an_unbounded_faithful_store_is_the_full_read(oracle):
    """(c) With a working context that never compresses (W_max above the stream), every stream
    forward reads the raw prefix at its true positions: the stored keys and the question's query
    equal the full read's, so the two modes differ only in what they may see."""
    task = _task(n_filler=150)
    n = len(TOK(task["context"] + task["question"])["input_ids"])
    world = replace(FAITHFUL, w_max=n + 64)
    pt = prepare_task(task, oracle, TOK, world, features=False, attention=True)
    assert np.all(pt.wc.levels == 0)
    full = keystore.read(oracle, pt.ids, 4)
    for k_f, k_s in zip(full.keys, pt.stream_keys, strict=True):
        np.testing.assert_allclose(k_s.numpy(), k_f.numpy(), atol=1e-5)
    q = keystore.question_query(oracle, pt.wc)
    np.testing.assert_allclose(q.numpy(), full.queries.numpy(), atol=1e-5)
    np.testing.assert_allclose(pt.attention_probs, full.probs(-1), atol=1e-5)
    # the default budget compresses: then the two stores differ
    small = prepare_task(task, oracle, TOK, FAITHFUL, features=False, attention=True)
    assert np.abs(small.attention_probs - full.probs(-1)).max() > 1e-3


def test_the_stream_read_tiles_the_stream_and_reports_its_cost(oracle):
    pt = prepare_task(_task(n_filler=300), oracle, TOK, FAITHFUL, features=False, attention=True)
    assert pt.stream_keys[0].shape[1] == pt.n_tokens
    cost = pt.read_cost
    assert cost["forwards"] == -(-pt.n_tokens // FAITHFUL.tail_tokens)  # one per R tokens
    # each forward runs its whole context (<= W_max), plus the question-time forward
    assert pt.n_tokens < cost["positions"] <= cost["forwards"] * WORLD.w_max + len(pt.wc)
    full = prepare_task(_task(n_filler=300), oracle, TOK, FULL, features=False, attention=True)
    assert full.read_cost["positions"] == full.n_tokens and full.stream_keys is None


def test_the_stream_read_shows_its_progress_in_tokens_and_reads_the_same(oracle, capsys):
    task = _task(n_filler=300)
    quiet = prepare_task(task, oracle, TOK, FAITHFUL, features=False, attention=True)
    capsys.readouterr()
    shown = prepare_task(task, oracle, TOK, FAITHFUL, features=False, attention=True,
                         progress=True)
    err = capsys.readouterr().err
    assert f"{task['id']}: stream read" in err and f"/{quiet.n_tokens} [" in err  # in tokens
    for a, b in zip(quiet.stream_keys, shown.stream_keys, strict=True):
        assert torch.equal(a, b)


def test_read_mode_and_read_tokens_are_checked():
    with pytest.raises(ConfigError, match="read mode"):
        TaskWorldConfig(read_mode="prefill")
    with pytest.raises(ConfigError, match="read_tokens"):
        TaskWorldConfig(tail_tokens=64, read_tokens=65)
    with pytest.raises(ConfigError, match="step_tokens"):
        TaskWorldConfig(tail_tokens=64, step_tokens=32, read_tokens=16)


# ------------------------------------------------------------------------------- the sink


def test_the_attention_baseline_opens_a_needle_in_block_0(oracle):
    """The sink is token 0, not block 0: a block-0 needle the question attends to ranks first and
    the zoom opens it (before, block 0 ranked last whatever its content)."""
    pt = prepare_task(_task(n_filler=300, at=1), oracle, TOK, FAITHFUL, features=False,
                      attention=True)
    n = pt.n_tokens
    probs = np.full((4, 2, n), 0.1 / n)
    probs[..., 0] = 0.5  # the sink
    probs[..., 2] = 0.4  # a token of block 0 (the needle's)
    pt.attention_probs = probs
    pt.read_mode = "full-read"  # these probabilities stand for every round's (no re-read)
    n_layers = oracle.model.config.num_hidden_layers
    rel = pt.block_attention(pt.wc, oracle, range(n_layers))
    assert int(np.argmax(rel)) == 0
    wc, info = zoom(Attention(), pt, FAITHFUL, oracle)
    assert info["expands"] >= 1 and wc.levels[0] == 0 and wc.starts[1] == 1


def test_the_cheap_label_labels_a_needle_in_block_0(oracle):
    """A store whose answer queries attend to a token of block 0 (besides the sink) labels block
    0 as the most relevant block, and its gist gets the top expand target."""
    rng = np.random.default_rng(0)
    n, b, layers, kvh, hd = 64, 4, 2, 1, 8
    keys = [0.1 * torch.as_tensor(rng.normal(size=(kvh, n, hd)), dtype=torch.float32)
            for _ in range(layers)]
    for k in keys:
        k[0, 0, 0] = k[0, 2, 1] = 6.0  # the sink's key and the needle token's (block 0)
    queries = torch.zeros(layers, 1, 1, hd)
    queries[..., :2] = 6.0  # attends to both
    store = keystore.KeyStore(keys, queries, n, b, hd**-0.5)
    rel = answer_relevance(store, n, b)
    assert int(np.argmax(rel)) == 0 and rel[0] > 0
    pt = prepare_task(_task(n_filler=300, at=1), oracle, TOK, FAITHFUL, features=False)
    full = np.zeros(pt.n_tokens // b)
    full[0] = 1.0
    gain, _ = cheap_targets(pt.wc, full)
    assert pt.wc.starts[int(np.argmax(gain))] == 0


# ------------------------------------------------------------------------------ the query


def test_the_query_is_exactly_the_question(oracle):
    task = _task(n_filler=300)
    pt = prepare_task(task, oracle, TOK, FAITHFUL, features=False, attention=True)
    assert pt.query == slice(pt.n_tokens - len(task["question"]), pt.n_tokens)
    assert pt.query_text == task["question"]
    item = lensnet_item(pt.wc, 3, 8, None, query=pt.query)
    q_rows = item["tail_mask"][3:]
    assert q_rows.sum() == len(task["question"])  # no more (no context pulled in), no less
    emb = pt.wc.tree.embeddings(0, np.arange(pt.query.start, pt.query.stop))
    np.testing.assert_array_equal(item["tail_gists"][3 : 3 + len(emb)], emb)
    # the block the question starts in keeps only its context text (307 = 76 * 4 + 3)
    q0, ctx = pt.query.start, task["context"]
    assert q0 == len(ctx) == 307 and pt.block_text[q0 // 4] == ctx[304:307]
    with pytest.raises(QueryTooLong, match="longer than LensNet's 2 query inputs"):
        lensnet_item(pt.wc, 3, 2, None, query=pt.query)
    # a task with no question: the stream's last context_query_tokens tokens
    assert query_span(100, 0, WORLD) == slice(100 - WORLD.context_query_tokens, 100)


def test_bm25_leaves_the_question_out_of_every_block(oracle):
    """The block the question starts in scores on its context text alone: the question's own
    word in it ("zq", found nowhere in the context) does not score it against the question."""
    from sim.taskworld.features import bm25_relevance

    task = _task(n_filler=302)  # 302 + 7 = 309 context tokens: the question starts mid-block
    task["question"] = " zq zq?"
    pt = prepare_task(task, oracle, TOK, FAITHFUL, features=False)
    q_block = pt.query.start // 4
    assert pt.query.start % 4 == 1 and q_block < len(pt.block_text)
    assert pt.block_text[q_block] == task["context"][308:309]
    assert pt.block_lexical[q_block] == 0.0
    # with the question's own tokens in its block, BM25 would score it against itself
    whole = [*pt.block_text[:q_block], task["context"][308:] + task["question"][:3]]
    assert bm25_relevance(whole, pt.query_text)[q_block] > 0


def test_a_question_longer_than_the_query_inputs_is_one_error_everywhere(oracle):
    """``check_query_fits`` is the one check of sim.evaluate, sim.tasklabels and sim.tasktrain: a
    TaskError naming the task, the question's length and the reader's limit (never a cut)."""
    from sim.policies import check_query_fits as policies_fit
    from sim.taskworld.world import TaskError, check_query_fits

    pt = prepare_task(_task(), oracle, TOK, FAITHFUL, features=False, attention=True)
    width = pt.query.stop - pt.query.start
    check_query_fits(pt, width)  # exactly as long: fine
    with pytest.raises(TaskError, match=rf"'t0'.*\({width} tokens\).*--query-tokens's 2 query"):
        check_query_fits(pt, 2, "--query-tokens")
    lens = _lens(oracle, oracle.model.config.num_hidden_layers)
    lens.config = replace(lens.config, n_query_tokens=2)
    small = LensNetPolicy(lens)
    with pytest.raises(TaskError, match="lensnet's 2 query inputs"):
        policies_fit(pt, [Attention(), small])
    policies_fit(pt, [Attention()])  # a policy that reads no query never refuses


@settings(max_examples=25, deadline=None)
@given(
    step=st.integers(1, 8), extra=st.integers(0, 8), tail_extra=st.integers(0, 8),
    n=st.integers(1, 400),
)
def test_stream_reads_tile_the_stream_with_their_tokens_at_l0(step, extra, tail_extra, n):
    """For any step <= read_tokens <= tail and any stream length (the last read partial or not),
    the recorded reads tile [0, n) in order, each at most read_tokens wide, and each read's tokens
    are the L0 end of the cover it was read with (what ``stream_read`` requires)."""
    read = step + extra
    world = replace(FAITHFUL, step_tokens=step, read_tokens=read, tail_tokens=read + tail_extra,
                    w_max=read + tail_extra + 3 * 4 + 1 + 40)
    tree = MegaContextTree(TreeConfig(block_size=4, max_level=2, d_model=2), reserve_tokens=n)
    tree.ingest(np.arange(n) % 7, np.zeros((n, 2), np.float32))
    _, _, reads = stream_cover(tree, n, 0, world, record_reads=True)
    assert reads[0].start == 0 and reads[-1].end == n
    for a, b in zip(reads, reads[1:], strict=False):
        assert a.end == b.start
    for r in reads:
        width = r.end - r.start
        assert 1 <= width <= read and r.wc.n_tokens == r.end
        assert np.all(r.wc.levels[-width:] == 0)
        np.testing.assert_array_equal(r.wc.indices[-width:], np.arange(r.start, r.end))


def test_a_budget_sweep_reads_the_stream_again(oracle):
    """``with_budget`` in the faithful mode: the keys depend on the budget (each block was read
    with the context before it), so they are read again and no cached query survives."""
    from sim.taskworld.world import with_budget

    pt = prepare_task(_task(n_filler=300), oracle, TOK, FAITHFUL, features=False, attention=True)
    pt.question_attention(zoom(Attention(), pt, FAITHFUL, oracle)[0], oracle)
    assert pt._attention
    wider = replace(FAITHFUL, w_max=96)
    other = with_budget(pt, wider, oracle)
    assert not other._attention and other.stream_keys is not pt.stream_keys
    direct = prepare_task(_task(n_filler=300), oracle, TOK, wider, features=False, attention=True)
    np.testing.assert_allclose(other.attention_probs, direct.attention_probs, atol=1e-6)
    assert np.abs(other.attention_probs - pt.attention_probs).max() > 1e-4
