"""The attention baseline (``sim.features.block_attention``, the ``attention`` policy): its feature
against the LM's own attention probabilities, its layer window, the sink block ranked last, and
``sim.evaluate`` computing the feature only when a chosen policy needs it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from megacontext.tree import ConfigError
from sim.features import (
    ATTENTION_LAYERS,
    attention_layer_range,
    attention_relevance,
    block_attention,
    rank01,
)
from sim.policies import Attention
from sim.scoring import focus_recall
from sim.taskworld import CharTokenizer, TaskWorldConfig, prepare_task, zoom
from tests.sim.test_taskworld import WORLD, _task


@pytest.fixture(scope="module")
def oracle():
    return LMOracle(tiny_llama())


def reference_mass(ids: np.ndarray, b: int, layers: list[int]) -> np.ndarray:
    """The attention mass per complete block by hand: a fresh copy of the tiny LM loaded with eager
    attention, one full forward with every layer's (n, n) attention, the last row summed block by
    block and averaged over the window's layers and heads."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=torch.as_tensor(ids)[None], output_attentions=True).attentions
    n_l1, heads = len(ids) // b, att[0].shape[1]
    out = np.zeros(n_l1)
    for k in layers:
        for h in range(heads):
            row = att[k][0, h, -1].double().numpy()
            for j in range(n_l1):
                out[j] += row[j * b : (j + 1) * b].sum()
    return out / (len(layers) * heads)


@pytest.mark.parametrize("window", [(0.25, 0.75), (1.0, 1.0), (0.0, 0.1)])
def test_block_attention_is_the_models_own_last_row_per_block(oracle, window):
    """A task whose stream ends in a partial block (its keys are left out, not renormalised): one
    value per complete block, equal to the eager attention of a full forward; the model is left on
    its own attention implementation."""
    world = replace(WORLD, attention_layers=window)
    task = _task(n_filler=201)  # 201 + 7 + 3 = 211 tokens: 52 blocks of 4 and 3 tokens over
    pt = prepare_task(task, oracle, CharTokenizer(512), world, features=False, attention=True)
    assert pt.n_tokens % WORLD.block_size == 3
    layers = list(attention_layer_range(window, oracle.model.config.num_hidden_layers))
    assert layers == {(0.25, 0.75): [1, 2], (1.0, 1.0): [3], (0.0, 0.1): [0]}[window]
    want = reference_mass(pt.ids, WORLD.block_size, layers)
    assert pt.block_attention.shape == (pt.n_tokens // WORLD.block_size,)
    np.testing.assert_allclose(pt.block_attention, want, rtol=1e-5, atol=1e-8)
    assert pt.block_attention.sum() < 1.0  # the partial block's mass is not spread over the others
    assert oracle.model.config._attn_implementation == "sdpa"
    # another window reads other layers: the values differ (the window is not ignored)
    other = block_attention(oracle, pt.ids, WORLD.block_size, [(layers[0] + 1) % 4])
    assert not np.allclose(other, pt.block_attention)
    # without attention=True nothing is computed
    plain = prepare_task(task, oracle, CharTokenizer(512), world, features=False)
    assert plain.block_attention is None


def test_the_key_store_leaves_no_hook_on_the_lm_on_error(oracle, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    attn = oracle.model.base_model.layers[0].self_attn
    monkeypatch.setattr(oracle, "decoder", broken)
    with pytest.raises(RuntimeError, match="boom"):
        block_attention(oracle, np.arange(20) % 512, 4, [0])
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks


def test_attention_layer_window_as_fractions_of_depth():
    assert attention_layer_range(ATTENTION_LAYERS, 30) == range(21, 26)  # SmolLM2: layers 21-25
    assert attention_layer_range((0.5, 0.5), 30) == range(15, 16)  # at least one layer
    assert attention_layer_range((1.0, 1.0), 30) == range(29, 30)  # clipped to the LM
    assert attention_layer_range((0.0, 1.0), 4) == range(0, 4)
    with pytest.raises(ConfigError, match="attention_layers"):
        TaskWorldConfig(attention_layers=(0.8, 0.2))
    with pytest.raises(ConfigError, match="attention_layers"):
        TaskWorldConfig(attention_layers=(0.5, 1.5))


def test_attention_policy_ranks_the_sink_last_and_zooms_to_the_top_block(oracle):
    """Planted masses: block 0 (the sink) holds the most, the needle's blocks the next most. The
    relevance ranks the sink last (below even the least attended block) and the needle's blocks
    first; a zoom with the policy brings the needle to L0 and leaves block 0 a gist."""
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True)
    n_l1, b = pt.n_tokens // WORLD.block_size, WORLD.block_size
    needle = np.unique(np.flatnonzero(pt.needle) // b)
    mass = np.random.default_rng(0).uniform(0.001, 0.01, n_l1)
    mass[0], mass[needle] = 0.5, 0.2
    pt.block_attention = mass
    rank = rank01(Attention().relevance(pt))
    assert rank[0] == 0.0 and set(np.argsort(rank)[-len(needle) :]) == set(needle)
    order = [np.argsort(x[1:], kind="stable") for x in (rank, mass)]
    np.testing.assert_array_equal(*order)  # the other blocks keep their order
    wc, _ = zoom(Attention(), pt, WORLD, oracle)
    assert focus_recall(pt, wc)
    assert not np.any((wc.starts == 0) & (wc.levels == 0))  # the sink's block stays under a gist
    # below every other block whatever their masses (a zero would tie with empty blocks)
    rel = attention_relevance(np.array([0.3, 0.0, 0.0]))
    assert rel[0] < rel[1:].min() and rank01(rel)[0] == 0.0
    pt.block_attention = None
    with pytest.raises(ValueError, match="attention=True"):
        Attention().relevance(pt)


def test_evaluate_runs_attention_and_computes_it_only_when_needed(tmp_path, monkeypatch):
    """``sim.evaluate --policies attention`` end to end on the tiny LM: the attention feature is
    computed once per task and the block-alone features not at all; with policies that do not read
    it, it is never computed. ``--world.attention-layers`` reaches the feature and command.txt."""
    import sim.taskworld as taskworld
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
    assert calls == [2, 2]  # once per task, the window's layers (2, 3) of the tiny LM's 4
    res = json.loads((out / "results.json").read_text())
    r = res["policies"]["attention"]
    assert r["n"] == 2 and 0.0 <= r["exact_match"] <= 1.0 and np.isfinite(r["answer_nll"])
    assert res["config"]["args"]["world"]["attention_layers"] == [0.5, 1.0]
    assert "--world.attention-layers 0.5 1.0" in (out / "command.txt").read_text()
    rows = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    assert {(x["id"], x["policy"]) for x in rows} == {
        (t, p) for t in ("t20", "t90") for p in ("attention", "recency")
    }
    calls.clear()
    with pytest.raises(SystemExit):
        main([*world, "--out", str(tmp_path / "run2"), "--policies", "recency,bm25"])
    assert calls == []


@pytest.mark.real_lm
def test_attention_ranks_a_planted_passkey_first_on_smollm2():
    """Held-out passkey tasks on SmolLM2 (short, for CPU): the last question token's attention in
    the default layer window ranks a needle block first among the context's blocks."""
    from megacontext.lm import load_lm
    from sim.tasks import TaskConfig, generate_tasks

    model, tok = load_lm("smollm2", device="cpu")
    oracle = LMOracle(model)
    world = TaskWorldConfig(w_max=128)
    tasks = generate_tasks(
        TaskConfig(kind="passkey", n_tasks=2, length=(512,), depths=(0.3, 0.7), split="heldout"),
        tok,
    )
    for task in tasks:
        pt = prepare_task(task, oracle, tok, world, features=False, attention=True)
        b = world.block_size
        rel = Attention().relevance(pt)[: (pt.n_tokens - pt.question_tokens) // b]
        blocks = np.unique(np.flatnonzero(pt.needle) // b)
        best = rel[blocks[blocks < len(rel)]].max()
        assert int((rel > best).sum()) == 0, task["id"]
