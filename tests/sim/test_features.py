"""The attention baseline (``PreparedTask.block_attention``, the ``attention`` policy): its feature
against the LM's own attention probabilities, its layer window per read mode, the sink token (not
its block) left out, and ``sim.evaluate`` computing the attention only when a chosen policy needs
it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError
from sim.policies import Attention
from sim.policy import FocusView
from sim.taskworld.features import ATTENTION_LAYERS, attention_layer_range, rank01
from sim.taskworld.scoring import focus_recall
from sim.taskworld.world import CharTokenizer, TaskWorldConfig, keystore, prepare_task, zoom
from tests.sim.test_taskworld import WORLD, _task


@pytest.fixture(scope="module")
def oracle():
    return LMOracle(tiny_llama())


def reference_mass(ids: np.ndarray, b: int, layers: list[int]) -> np.ndarray:
    """The attention mass per complete block by hand: a fresh copy of the tiny LM loaded with eager
    attention, one full forward with every layer's (n, n) attention, the last row without the sink
    token (renormalised over the rest) summed block by block and averaged over the window's layers
    and heads."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=torch.as_tensor(ids)[None], output_attentions=True).attentions
    n_l1, heads = len(ids) // b, att[0].shape[1]
    out = np.zeros(n_l1)
    for k in layers:
        for h in range(heads):
            row = att[k][0, h, -1].double().numpy()
            row[0] = 0.0
            row /= row.sum()
            for j in range(n_l1):
                out[j] += row[j * b : (j + 1) * b].sum()
    return out / (len(layers) * heads)


@pytest.mark.parametrize("window", [(0.25, 0.75), (1.0, 1.0), (0.0, 0.1)])
def test_block_attention_is_the_models_own_last_row_per_block(oracle, window):
    """Full read, a task whose stream ends in a partial block (its keys are left out, not
    renormalised): one value per complete block, equal to the eager attention of a full forward
    without the sink token; the model is left on its own attention implementation. The faithful
    store with a working context that never compresses gives the same values."""
    world = replace(WORLD, attention_layers=window, read_mode="full-read")
    task = _task(n_filler=201)  # 201 + 7 + 3 = 211 tokens: 52 blocks of 4 and 3 tokens over
    pt = prepare_task(task, oracle, CharTokenizer(512), world, features=False, attention=True)
    assert pt.n_tokens % WORLD.block_size == 3
    layers = list(attention_layer_range(window, oracle.model.config.num_hidden_layers))
    assert layers == {(0.25, 0.75): [1, 2], (1.0, 1.0): [3], (0.0, 0.1): [0]}[window]
    want = reference_mass(pt.ids, WORLD.block_size, layers)
    got = pt.block_attention(pt.wc, oracle, layers)
    assert got.shape == (pt.n_tokens // WORLD.block_size,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert got.sum() < 1.0  # the partial block's mass is not spread over the others
    assert oracle.model.config._attn_implementation == "sdpa"
    # another window reads other layers: the values differ (the window is not ignored)
    other = pt.block_attention(pt.wc, oracle, [(layers[0] + 1) % 4])
    assert not np.allclose(other, got)
    unbounded = replace(world, read_mode="faithful", w_max=pt.n_tokens + 64)
    faithful = prepare_task(task, oracle, CharTokenizer(512), unbounded, features=False,
                            attention=True)
    np.testing.assert_allclose(faithful.block_attention(faithful.wc, oracle, layers), want,
                               rtol=1e-4, atol=1e-7)
    # without attention=True nothing is computed
    plain = prepare_task(task, oracle, CharTokenizer(512), world, features=False)
    assert plain.attention_probs is None
    with pytest.raises(ValueError, match="attention=True"):
        plain.block_attention(plain.wc, oracle, layers)


def test_the_key_store_leaves_no_hook_on_the_lm_on_error(oracle, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    attn = oracle.model.base_model.layers[0].self_attn
    monkeypatch.setattr(oracle, "decoder", broken)
    with pytest.raises(RuntimeError, match="boom"):
        keystore.read(oracle, np.arange(20) % 512, 4)
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks


def test_attention_layer_window_as_fractions_of_depth():
    full = attention_layer_range(ATTENTION_LAYERS["full-read"], 30)
    assert full == range(18, 22)  # SmolLM2: layers 18-21, chosen on full reads of train tasks
    assert attention_layer_range(ATTENTION_LAYERS["faithful"], 30) == range(18, 19)
    assert TaskWorldConfig(read_mode="full-read").attention_window == ATTENTION_LAYERS["full-read"]
    assert TaskWorldConfig().attention_window == ATTENTION_LAYERS["faithful"]  # the default mode
    assert TaskWorldConfig(attention_layers=(0.1, 0.2)).attention_window == (0.1, 0.2)
    assert attention_layer_range((0.5, 0.5), 30) == range(15, 16)  # at least one layer
    assert attention_layer_range((1.0, 1.0), 30) == range(29, 30)  # clipped to the LM
    assert attention_layer_range((0.0, 1.0), 4) == range(0, 4)
    with pytest.raises(ConfigError, match="attention_layers"):
        TaskWorldConfig(attention_layers=(0.8, 0.2))
    with pytest.raises(ConfigError, match="attention_layers"):
        TaskWorldConfig(attention_layers=(0.5, 1.5))


def test_attention_policy_leaves_the_sink_token_out_and_zooms_to_the_top_block(oracle):
    """Planted probabilities: token 0 (the sink) holds the most, the needle's tokens the next
    most. The sink's mass is left out, so the needle's blocks rank first and block 0 ranks among
    the others by its content; a zoom brings the needle to L0 and leaves block 0 a gist."""
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True)
    pt.read_mode = "full-read"  # the planted probabilities stand for every round's
    b = WORLD.block_size
    needle = np.unique(np.flatnonzero(pt.needle) // b)
    probs = np.random.default_rng(0).uniform(0.001, 0.01, (4, 2, pt.n_tokens))
    probs[..., 0] = 5.0
    probs[..., 1:b] = 0.0065  # block 0's content: a middling block (others hold 4 x U(.001, .01))
    probs[..., pt.needle] = 0.5
    pt.attention_probs = probs / probs.sum(axis=-1, keepdims=True)
    view = FocusView(pt.wc, 3, oracle, pt.answer_ids, True, pt, (0.0, 1.0))
    rel = pt.block_attention(pt.wc, oracle, range(4))
    rank = rank01(rel)
    assert set(np.argsort(rank)[-len(needle) :]) == set(needle)
    assert 0 < rank[0] < 1  # block 0: scored on its three content tokens, not first, not last
    np.testing.assert_allclose(Attention().scores(view), Attention((0.0, 1.0)).scores(view))
    wc, _ = zoom(Attention(), pt, WORLD, oracle)
    assert focus_recall(pt, wc)
    assert not np.any((wc.starts == 0) & (wc.levels == 0))  # block 0 stays under a gist


def test_evaluate_runs_attention_and_computes_it_only_when_needed(tmp_path, monkeypatch):
    """``sim.evaluate --policies attention`` end to end on the tiny LM: the attention feature is
    computed once per task and the block-alone features not at all; with policies that do not read
    it, it is never computed. ``--world.attention-layers`` reaches the feature and command.txt."""
    import sim.taskworld.world as taskworld
    from sim.evaluate import DEFAULT_POLICIES, main

    assert "bm25,attention," in DEFAULT_POLICIES
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(_task(at=at, tid=f"t{at}")) + "\n" for at in (20, 90)))
    calls = []
    real = taskworld.block_mass

    def spy(probs, b):
        calls.append(probs.shape[0])  # layers of the window
        return real(probs, b)

    def no_features(*args, **kwargs):
        raise AssertionError("block-alone features computed for policies that do not read them")

    monkeypatch.setattr(taskworld, "block_mass", spy)
    monkeypatch.setattr(taskworld, "block_features", no_features)
    world = ["--world.block-size", "4", "--world.w-max", "64", "--world.tail-tokens", "24"]
    world += ["--world.step-tokens", "4", "--no-progress", "--lm", "tiny", "--tasks", str(path)]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [*world, "--out", str(out), "--policies", "attention,recency"]
            + ["--world.attention-layers", "0.5", "1.0"]
        )
    assert exit_info.value.code == 0
    # once per zoom round and task, each time the window's layers (2, 3) of the tiny LM's 4
    rounds = [x["rounds"] for x in rows_of(out) if x["policy"] == "attention"]
    assert calls == [2] * sum(rounds) and sum(rounds) >= 2
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["args"]["world"]["attention_layers"] == [0.5, 1.0]
    assert "--world.attention-layers '[0.5, 1.0]'" in (out / "command.txt").read_text()
    rows = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    assert {(x["id"], x["policy"]) for x in rows} == {
        (t, p) for t in ("t20", "t90") for p in ("attention", "recency")
    }
    for name in ("attention", "recency"):  # each summary is the mean of that policy's own rows
        own = [x for x in rows if x["policy"] == name]
        r = res["policies"][name]
        assert r["n"] == 2
        assert r["exact_match"] == pytest.approx(np.mean([x["exact_match"] for x in own]))
        assert r["answer_nll"] == pytest.approx(np.mean([x["answer_nll"] for x in own]))
    calls.clear()
    with pytest.raises(SystemExit) as exit_info:
        main([*world, "--out", str(tmp_path / "run2"), "--policies", "recency,bm25"])
    assert exit_info.value.code == 0
    assert calls == []


def rows_of(out) -> list[dict]:
    return [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]


@pytest.mark.real_lm
def test_attention_ranks_a_planted_passkey_first_on_smollm2():
    """Held-out passkey tasks on SmolLM2 (short, for CPU): the last question token's attention in
    the default layer window ranks a needle block first among the context's blocks."""
    from megacontext.lm import load_lm
    from sim.tasks import TaskConfig, generate_tasks

    model, tok = load_lm("smollm2", device="cpu")
    oracle = LMOracle(model)
    world = TaskWorldConfig(w_max=128, read_mode="full-read")
    tasks = generate_tasks(
        TaskConfig(kind="passkey", n_tasks=2, length=(512,), depths=(0.3, 0.7), split="heldout"),
        tok,
    )
    for task in tasks:
        pt = prepare_task(task, oracle, tok, world, features=False, attention=True)
        b = world.block_size
        layers = attention_layer_range(world.attention_window, model.config.num_hidden_layers)
        rel = pt.block_attention(pt.wc, oracle, layers)[: pt.query.start // b]
        blocks = np.unique(np.flatnonzero(pt.needle) // b)
        best = rel[blocks[blocks < len(rel)]].max()
        assert int((rel > best).sum()) == 0, task["id"]


def test_the_attention_window_benchmark_picks_the_layers_that_rank_the_needle_first():
    """``benchmarks.attention_window``: per window the needle block's rank over tasks; the best MRR
    wins, ties go to the narrower, then the earlier window."""
    from benchmarks.attention_window import best_window, window_table

    # 3 layers, 3 blocks, the needle is block 0: only layer 1 ranks it first
    masses = [np.array([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])]
    table = window_table(masses, [np.array([0])], max_width=3)
    assert set(table) == {"0-1", "1-2", "2-3", "0-2", "1-3", "0-3"}
    assert table["1-2"]["hit1"] == 1.0 and table["0-1"]["mrr"] == pytest.approx(1 / 3)
    assert best_window(table)["lo"] == 1 and best_window(table)["hi"] == 2
    # 0-2 ranks it first too (mean 0.45 > 0.3): the narrower window wins the tie
    assert table["0-2"]["mrr"] == 1.0


@pytest.mark.parametrize("layers", [0, 1, [1, 2], 3])
def test_block_hidden_states_stop_early_without_surprisal(oracle, layers):
    """Without surprisal the block-alone forwards stop at the retrieval layer: the same hidden
    states as the whole forward's ``hidden_states`` (to float tolerance), no surprisal, the layers
    above never run, and no hook is left on the LM."""
    from sim.taskworld.features import block_features

    rng = np.random.default_rng(0)
    ids, query = rng.integers(1, 500, 70), rng.integers(1, 500, 5)
    h, nll, q = block_features(oracle, ids, 8, query, layers, chunk=3)
    h2, nll2, q2 = block_features(oracle, ids, 8, query, layers, chunk=3, surprisal=False)
    assert nll2 is None and nll.shape == (8,)
    np.testing.assert_allclose(h2, h, atol=1e-5)
    np.testing.assert_allclose(q2, q, atol=1e-5)
    ran = []
    blocks = oracle.model.base_model.layers
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in
             enumerate(blocks)]
    try:
        block_features(oracle, ids, 8, query, layers, chunk=16, surprisal=False)
    finally:
        for x in hooks:
            x.remove()
    top = max([layers] if isinstance(layers, int) else layers)
    assert set(ran) == set(range(top))  # the layer whose input is read never runs, nor above
    assert not any(b._forward_pre_hooks for b in blocks)
