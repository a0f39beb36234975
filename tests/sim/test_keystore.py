"""The key store and LensNet's task inputs (issue 18, items 1-3): attention features against the
LM's own attention, the cheap label against a direct computation, the question reaching LensNet,
and the task labeller end to end on the tiny LM."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lensnet.data import collate
from lensnet.model import LensNet, LensNetConfig
from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from megacontext.traces import TraceReader
from megacontext.tree import ConfigError
from sim.tasklabels import GROUP_DISCOUNT, TaskLabelArgs, cheap_targets, generate, spearman
from sim.taskworld.features import lensnet_item
from sim.taskworld.world import CharTokenizer, TaskWorldConfig, keystore, prepare_task, zoom
from tests.sim.test_taskworld import WORLD, NeedleFinder, _task


@pytest.fixture(scope="module")
def oracle():
    return LMOracle(tiny_llama())


def _eager_attentions(oracle, ids: np.ndarray) -> list[torch.Tensor]:
    """The LM's own attention probabilities, every layer, from one full eager forward."""
    model = oracle.model
    own = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        x = torch.as_tensor(ids)[None]
        out = oracle.decoder(
            input_ids=x, output_attentions=True, use_cache=False, attention_mask=torch.ones_like(x)
        )
    finally:
        model.set_attn_implementation(own)
    return [a[0].double() for a in out.attentions]  # per layer (H, n, n)


def test_full_store_reproduces_the_lms_own_attention(oracle):
    ids = np.random.default_rng(0).integers(0, 512, 300)
    store = keystore.read(oracle, ids, 4, n_queries=5)
    ref = _eager_attentions(oracle, ids)
    for r in range(5):
        pos = 300 - 5 + r
        want = torch.stack([a[:, pos, : pos + 1] for a in ref]).numpy()  # (L, H, pos+1)
        np.testing.assert_allclose(store.probs(r), want, atol=1e-6)
    assert store.bytes_per_token() == 2 * 2 * 16 * 4  # fp16 x KV heads x head dim x layers


def test_the_benchmarks_mean_keys_are_a_distribution_and_equal_full_at_block_size_one(oracle):
    """``benchmarks.keystore.mean_key_probs``, the compressed store the benchmark measures."""
    from benchmarks.keystore import mean_key_probs

    ids = np.random.default_rng(1).integers(0, 512, 203)
    mean = mean_key_probs(keystore.read(oracle, ids, 4))
    np.testing.assert_allclose(mean.sum(-1), 1.0, atol=1e-9)
    assert np.all(mean[..., :200].reshape(*mean.shape[:2], 50, 4).std(-1) < 1e-12)  # per block
    one = keystore.read(oracle, ids, 1)
    np.testing.assert_allclose(mean_key_probs(one), one.probs(-1), atol=1e-9)


def test_span_features_against_a_loop(oracle):
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True)
    wc, _ = zoom(NeedleFinder(), pt, WORLD, oracle)  # a cover with gists of both levels and tokens
    b = wc.block_size
    feats = keystore.span_features(pt.attention_probs, wc.starts, wc.ends, b)
    p = pt.attention_probs.astype(np.float64)
    n_layers, n = p.shape[0], pt.n_tokens
    assert feats.shape == (len(wc), keystore.n_entry_features(n_layers))
    rest = 1 - p[:, :, :1].sum(-1)  # the sink left out, the rest renormalised
    for i in range(len(wc)):
        lo, hi = int(wc.starts[i]), int(wc.ends[i])
        mass = p[:, :, max(lo, 1) : hi].sum(-1) / rest
        blocks = [
            p[:, :, max(j, 1) : min(j + b, n)].sum(-1) / rest for j in range(lo - lo % b, hi, b)
        ]
        best = np.max([m.mean(1) for m in blocks], axis=0)
        want = np.concatenate(
            [
                np.log(1e-6 + mass.mean(1)) / keystore.LOG_SCALE,
                np.log(1e-6 + mass.max(1)) / keystore.LOG_SCALE,
                np.log(1e-6 + best) / keystore.LOG_SCALE,
                [float(lo == 0)],
            ]
        )
        np.testing.assert_allclose(feats[i], want, atol=1e-5)


def test_relative_and_lexical_features_against_a_loop(oracle):
    """'relative-lexical': each log-mass column less its largest value over the context, then the
    best block's BM25 over the best of all blocks and whether the entry holds that block."""
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True)
    wc, _ = zoom(NeedleFinder(), pt, WORLD, oracle)
    b, n_layers = wc.block_size, pt.attention_probs.shape[0]
    lex = np.random.default_rng(3).random(pt.n_tokens // b)
    item = lensnet_item(wc, WORLD.n_tail_gists, 0, pt.attention_probs, "relative-lexical", lex)
    feats = item["entry_features"]
    assert feats.shape == (len(wc), keystore.n_entry_features(n_layers, "relative-lexical"))
    absolute = keystore.span_features(pt.attention_probs, wc.starts, wc.ends, b)
    want = absolute[:, :-1] - absolute[:, :-1].max(axis=0)
    np.testing.assert_allclose(feats[:, : 3 * n_layers], want, atol=1e-6)
    np.testing.assert_array_equal(feats[:, 3 * n_layers], absolute[:, -1])  # the sink flag
    for i in range(len(wc)):
        blocks = [j // b for j in range(int(wc.starts[i]), int(wc.ends[i]))
                  if (j // b + 1) * b <= pt.n_tokens]
        best = max((lex[j] for j in blocks), default=0.0) / lex.max()
        assert feats[i, -2] == pytest.approx(best, abs=1e-6)
        assert feats[i, -1] == float(int(np.argmax(lex)) in blocks)
    # no block matches the question: the lexical features are all zero
    zero = lensnet_item(wc, WORLD.n_tail_gists, 0, pt.attention_probs, "relative-lexical",
                        np.zeros_like(lex))["entry_features"]
    assert np.all(zero[:, -2:] == 0)
    with pytest.raises(ValueError, match="lexical"):
        lensnet_item(wc, WORLD.n_tail_gists, 0, pt.attention_probs, "relative-lexical")
    with pytest.raises(ConfigError, match="unknown feature set"):
        lensnet_item(wc, WORLD.n_tail_gists, 0, pt.attention_probs, "bogus", lex)


def test_relative_features_do_not_change_when_every_mass_scales(oracle):
    """A stream twice as long spreads the same attention over twice the blocks: relative features
    of the same entries are unchanged when every mass is scaled by a constant, absolute ones are
    not."""
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True)
    wc = pt.wc
    p = pt.attention_probs.astype(np.float64)
    q = p.copy()
    q[..., 1:] *= 0.5  # every non-sink mass halves; the sink takes the rest
    q[..., 0] = 1 - q[..., 1:].sum(-1)
    args = (wc.starts, wc.ends, wc.block_size)
    rel = [keystore.span_features(x, *args, relative=True) for x in (p, q)]
    np.testing.assert_allclose(rel[0], rel[1], atol=1e-5)


def test_cheap_label_against_a_direct_attention_computation(oracle):
    task = _task(at=40)
    tok = CharTokenizer(512)
    full = replace(WORLD, read_mode="full-read")
    pt = prepare_task(task, oracle, tok, full, features=False, attention=True,
                      answer_attention=True)
    ids = np.concatenate([pt.ids, pt.answer_ids[:-1]])
    ref = _eager_attentions(oracle, ids)
    n, b, h = pt.n_tokens, WORLD.block_size, len(pt.answer_ids)
    n_l1 = n // b
    want = np.zeros(n_l1)
    for pos in range(n - 1, n - 1 + h):  # the positions that predict the answer tokens
        for a in ref:  # per layer: the best head's mass on each block, the sink token left out
            row = a[:, pos, :n].clone()
            row[:, 0] = 0.0
            row /= row.sum(-1, keepdim=True)
            per_block = row[:, : n_l1 * b].reshape(a.shape[0], n_l1, b).sum(-1)
            want += per_block.max(0).values.numpy()
    want /= h * len(ref)
    assert want[0] > 0  # block 0 is labelled on its content (its tokens 1..b-1)
    np.testing.assert_allclose(pt.answer_relevance, want, atol=1e-6)
    # full read: the same forward's first row is the last stream token's attention
    last = torch.stack([a[:, n - 1, :n] for a in ref]).numpy()
    np.testing.assert_allclose(pt.attention_probs, last, atol=1e-6)


def test_cheap_targets_against_a_loop(oracle):
    """Covers after one zoom round (the needle's L2 gist opened into a legal group of four L1
    gists) and after two (its L1 gists opened into tokens), each entry against a loop."""
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False)
    one_round = TaskWorldConfig(**{**WORLD.__dict__, "zoom_rounds": 1})
    wc1, _ = zoom(NeedleFinder(), pt, one_round, oracle)
    wc2, _ = zoom(NeedleFinder(), pt, WORLD, oracle)
    b = WORLD.block_size
    rel = np.random.default_rng(3).random(pt.n_tokens // b)
    padded = np.concatenate([rel, [1.0]])  # the trailing partial block counts as relevant
    for wc in (wc1, wc2):
        gain, cost = cheap_targets(wc, rel)
        gid = wc.group_ids()
        for i in range(len(wc)):
            lo, hi = min(wc.starts[i] // b, len(rel)), min((wc.ends[i] - 1) // b, len(rel))
            assert gain[i] == pytest.approx(padded[lo : hi + 1].max() if wc.levels[i] >= 1 else 0)
            if gid[i] >= 0:
                s = gid[i]
                lo, hi = wc.starts[s] // b, (wc.ends[s + b - 1] - 1) // b
                discount = GROUP_DISCOUNT ** wc.levels[s]  # groups of gists give up less
                assert cost[i] == pytest.approx(rel[lo : hi + 1].max() * discount)
            else:
                assert cost[i] == 0.0
    # the best L1 gist of a legal group of L1 gists (the opened L2 gist) keeps a positive target
    gain, cost = cheap_targets(wc1, rel)
    l1 = np.flatnonzero((wc1.levels == 1) & (wc1.group_ids() >= 0))
    assert l1.size == b  # the one L2 gist the round opened: its four L1 children
    best = l1[np.argmax(gain[l1])]
    assert gain[best] - cost[best] > 0


def test_spearman_matches_a_direct_rank_correlation():
    a = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    b = np.array([1.0, 0.0, 0.5, 0.7, 2.0])
    ra = np.array([3, 0, 1.5, 1.5, 4])
    rb = np.array([3, 0, 1, 2, 4])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def _jsonl(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_agreement_summary_on_hand_written_logs(tmp_path):
    """agreement_summary on logs whose answers are worked out by hand: a resumed run's repeated
    row counts once, snapshots without a gain leave the hit rates, a task with no agreement row
    leaves the cheap forward's mean, and the covers per forward come from the cheap run."""
    from sim.tasklabels import agreement_summary

    rows = [
        {"task": "a", "cover": 0, "kind": "passkey", "top1": 1, "top3": 1, "spearman": 0.5,
         "exact_s": 2.0},
        {"task": "a", "cover": 1, "kind": "passkey", "top1": 0, "top3": 1, "spearman": 0.1,
         "exact_s": 4.0},
        {"task": "b", "cover": 0, "kind": "vt", "top1": None, "top3": None, "spearman": None,
         "exact_s": 6.0},
    ]
    costs = [{"task": "a", "forward_s": 0.5, "covers": 2}, {"task": "b", "forward_s": 1.5,
             "covers": 2}, {"task": "c", "forward_s": 100.0, "covers": 2}]  # c: no snapshot
    _jsonl(tmp_path / "exact" / "agreement.jsonl", [*rows, rows[0]])  # a rerun repeats a row
    _jsonl(tmp_path / "exact" / "cost.jsonl", costs)
    _jsonl(tmp_path / "cheap" / "cost.jsonl", [{"task": "x", "forward_s": 0.1, "covers": 4}])
    s = agreement_summary(tmp_path / "exact", tmp_path / "cheap")
    assert (s["snapshots"], s["n_with_a_gain"], s["cheap_tasks"]) == (3, 2, 2)
    assert (s["top1"], s["top3"]) == (0.5, 1.0)
    assert s["spearman_mean"] == pytest.approx(0.3)
    assert s["exact_s_per_snapshot"] == pytest.approx(4.0)  # (2 + 4 + 6) / 3
    assert s["cheap_forward_s_per_task"] == pytest.approx(1.0)  # (0.5 + 1.5) / 2
    assert s["covers_per_forward"] == 4
    assert s["speedup_one_snapshot_per_forward"] == pytest.approx(4.0)
    assert s["speedup_at_covers"] == pytest.approx(16.0)
    assert s["per_kind"]["passkey"] == pytest.approx(
        {"snapshots": 2, "top1": 0.5, "top3": 1.0, "spearman_mean": 0.3})
    assert s["per_kind"]["vt"]["snapshots"] == 1 and np.isnan(s["per_kind"]["vt"]["top1"])
    # no cheap run: the exact run's own covers per forward; --shard parts read as one run
    alone = agreement_summary(tmp_path / "exact")
    assert (alone["covers_per_forward"], alone["speedup_at_covers"]) == (2, pytest.approx(8.0))
    _jsonl(tmp_path / "parts" / "part-0-of-2" / "agreement.jsonl", rows[:2])
    _jsonl(tmp_path / "parts" / "part-1-of-2" / "agreement.jsonl", rows[2:])
    _jsonl(tmp_path / "parts" / "part-0-of-2" / "cost.jsonl", costs[:1])
    _jsonl(tmp_path / "parts" / "part-1-of-2" / "cost.jsonl", costs[1:])
    parts = agreement_summary(tmp_path / "parts", tmp_path / "cheap")
    assert {k: v for k, v in parts.items() if k != "per_kind"} == pytest.approx(
        {k: v for k, v in s.items() if k != "per_kind"})


def test_the_question_reaches_lensnet(oracle):
    """At question time, changing only the question changes LensNet's scores of the context before
    it, and every question token is among its inputs (the question sits in the trailing partial
    block, which has no gist: before, it reached the scores only through the stacks' mixing)."""
    world = TaskWorldConfig(**{**WORLD.__dict__, "question_tail": True})
    tok = CharTokenizer(512)
    a, b = _task(n_filler=201), _task(n_filler=201)  # the context ends on a block boundary
    b["question"] = "\nQ?"
    pa, pb = (prepare_task(t, oracle, tok, world, features=False, attention=True) for t in (a, b))
    q = pa.question_tokens
    assert pa.n_tokens % world.block_size == q  # the question is the partial block
    n_layers = oracle.model.config.num_hidden_layers
    torch.manual_seed(0)
    cfg = LensNetConfig.tiny(
        oracle.d_model, max_level=2, block_size=4, n_query_tokens=8,
        n_entry_features=keystore.n_entry_features(n_layers),
    )
    lens = LensNet(cfg).eval()
    torch.nn.init.normal_(lens.head.weight)

    def scores(pt, model, n_query, probs):
        item = lensnet_item(pt.wc, world.n_tail_gists, n_query, probs, query=pt.query)
        return model(collate([item]))[0].detach().numpy(), item

    sa, item = scores(pa, lens, 8, pa.attention_probs)
    sb, _ = scores(pb, lens, 8, pb.attention_probs)
    context = pa.wc.ends <= pa.n_tokens - q  # entries wholly before the question
    assert np.abs(sa[context] - sb[context]).max() > 1e-4
    emb = pa.wc.tree.embeddings(0, np.arange(pa.n_tokens - q, pa.n_tokens))
    tail = item["tail_gists"][item["tail_mask"]]
    assert all(np.any(np.all(np.isclose(tail, e), axis=1)) for e in emb)  # every question token


def _without_feature_set(src, dst):
    """A copy of the trace at ``src`` whose manifest names no feature set (as traces written
    before feature sets did)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["meta"]["feature_set"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _write_tasks(path, n=2):
    lines = [json.dumps(_task(at=20 + 30 * i, tid=f"t{i}")) + "\n" for i in range(n)]
    path.write_text("".join(lines))


def test_task_labeller_cheap_and_exact_end_to_end(tmp_path, oracle):
    tasks = tmp_path / "tasks.jsonl"
    _write_tasks(tasks)
    world = ["--world.block-size", "4", "--world.w-max", "64", "--world.tail-tokens", "24"]
    world += ["--world.step-tokens", "4", "--world.n-tail-gists", "3"]
    base = ["--lm", "tiny", "--tasks", str(tasks), "--covers", "3", "--query-tokens", "8"]
    base += ["--no-progress", "--gister", "mean", *world]
    from megacontext.cli import parse

    cheap = generate(parse(TaskLabelArgs, [*base, "--out", str(tmp_path / "cheap")]))
    r = TraceReader(cheap)
    assert len(r) == 6 and r.n_entry_features == keystore.n_entry_features(4, "relative-lexical")
    assert r.meta["feature_set"] == "relative-lexical"
    assert r.n_tail_gists == 3 + 8 and r.meta["labels"] == "cheap"
    s = r[0]
    assert s["entry_features"].shape == (len(s["levels"]), r.n_entry_features)
    assert np.all(s["target_utilities"][~s["action_mask"]] == 0)
    # exact: the first cover's targets are label_snapshot's, and the agreement log is complete
    args = parse(TaskLabelArgs, [*base, "--out", str(tmp_path / "exact"), "--labels", "exact"])
    exact = generate(args)
    r = TraceReader(exact)
    rows = [json.loads(x) for x in (exact / "agreement.jsonl").read_text().splitlines()]
    assert len(r) == len(rows) == 6
    assert all(x["exact_s"] > 0 and x["cheap_s"] > 0 for x in rows)
    from megacontext.labels import label_snapshot

    pt = prepare_task(_task(at=20, tid="t0"), oracle, CharTokenizer(512), args.world,
                      features=False)
    want = label_snapshot(pt.wc, oracle, pt.answer_ids, pt.n_tokens, 3, 0, lookahead=True)
    np.testing.assert_allclose(r[0]["target_utilities"], want["target_utilities"], atol=1e-5)
    # hybrid: on the same covers, every collapse cost is the exact one, a labelled expand gain
    # never exceeds the exact (its lookahead tries fewer children), and every expandable gist
    # left unlabelled is out of the loss (action_mask)
    hybrid = TraceReader(generate(parse(TaskLabelArgs, [
        *base, "--out", str(tmp_path / "hybrid"), "--labels", "hybrid", "--exact-top", "2"])))
    assert len(hybrid) == 6 and hybrid.meta["exact_top"] == 2
    for k in range(6):
        h, e = hybrid[k], r[k]
        np.testing.assert_array_equal(h["levels"], e["levels"])
        np.testing.assert_allclose(h["collapse_cost"], e["collapse_cost"], atol=1e-5)
        labelled = h["can_expand"].astype(bool) & h["action_mask"].astype(bool)
        assert 0 < labelled.sum() <= 2
        assert np.all(h["expand_gain"][labelled] <= e["expand_gain"][labelled] + 1e-5)
        flat = labelled & (h["levels"] == 1)  # level 1: no lookahead, the same label
        np.testing.assert_allclose(h["expand_gain"][flat], e["expand_gain"][flat], atol=1e-5)
        rest = h["can_expand"].astype(bool) & ~labelled
        assert rest.any() and not h["action_mask"].astype(bool)[rest].any()
    # traces written before the group discount, retargeted, equal what the labeller now writes
    from megacontext.traces import TraceWriter
    from sim.tasklabels import retarget

    new = TraceReader(cheap)
    old_meta = {k: v for k, v in new.meta.items() if k != "group_discount"}
    old = TraceWriter(tmp_path / "old", old_meta)
    for i in range(len(new)):
        snap = dict(new[i])
        snap["collapse_cost"] = snap["collapse_cost"] / GROUP_DISCOUNT ** snap["levels"]
        snap["target_utilities"] = (
            np.where(snap["can_expand"], snap["expand_gain"], 0)
            - np.where(snap["can_collapse"], snap["collapse_cost"], 0)
        ).astype(np.float32)
        old.add(snap)
    old.close()
    again = TraceReader(retarget(tmp_path / "old", tmp_path / "again"))
    for i in range(len(new)):
        np.testing.assert_allclose(again[i]["target_utilities"], new[i]["target_utilities"],
                                   atol=1e-7)
    with pytest.raises(ConfigError, match="before the group discount"):
        retarget(cheap, tmp_path / "twice")
    # refeature: the same covers rebuilt, labels kept, inputs recomputed (here: unchanged)
    from sim.tasklabels import refeature

    re = TraceReader(refeature(exact, tmp_path / "re", lm="tiny"))
    assert len(re) == len(r)
    for i in range(len(r)):
        for key in ("target_utilities", "levels", "entry_features", "tail_gists"):
            np.testing.assert_allclose(re[i][key], r[i][key], atol=1e-6)
    # a manifest that does not name its feature set: an error naming the trace and the field
    unnamed = _without_feature_set(exact, tmp_path / "unnamed")
    with pytest.raises(ConfigError, match="no 'feature_set'") as err:
        refeature(unnamed, tmp_path / "re2", lm="tiny")
    assert str(unnamed) in str(err.value) and "--feature-set" in str(err.value)
    assert len(TraceReader(refeature(unnamed, tmp_path / "re2", lm="tiny",
                                     feature_set="relative-lexical"))) == len(r)
    # a rerun resumes: nothing is labelled twice, and the summary counts each snapshot once
    generate(args)
    assert len(TraceReader(exact)) == 6
    from sim.tasklabels import agreement_summary

    summary = agreement_summary(exact, cheap)  # its arithmetic: the hand-written logs' test
    assert summary["snapshots"] == 6 and summary["covers_per_forward"] == 3
    assert summary["cheap_tasks"] == 2 and summary["exact_s_per_snapshot"] > 0



TINY_WORLD = ["--world.block-size", "4", "--world.w-max", "64", "--world.tail-tokens", "24"]
TINY_WORLD += ["--world.step-tokens", "4", "--world.n-tail-gists", "3"]


def test_tasktrain_trains_selects_calibrates_and_evaluate_reads_it(tmp_path, oracle):
    """Cheap traces -> exact validation -> a calibrated LensNet with the task inputs, which
    ``sim.evaluate`` then runs (its attention features computed because it needs them)."""
    from megacontext.cli import parse
    from sim.evaluate import main as evaluate_main
    from sim.tasktrain import TaskTrainArgs, run

    tasks = tmp_path / "tasks.jsonl"
    _write_tasks(tasks, 3)
    base = ["--lm", "tiny", "--tasks", str(tasks), "--covers", "2", "--query-tokens", "8"]
    base += ["--no-progress", "--gister", "mean", *TINY_WORLD]
    generate(parse(TaskLabelArgs, [*base, "--out", str(tmp_path / "train")]))
    generate(parse(TaskLabelArgs, [*base, "--out", str(tmp_path / "val"), "--labels", "exact"]))
    args = parse(
        TaskTrainArgs,
        ["--traces", str(tmp_path / "train"), "--val-traces", str(tmp_path / "val"),
         "--out", str(tmp_path / "lens"), "--lm", "tiny", "--preset", "tiny", "--no-progress",
         "--cal-tasks", str(tasks),
         "--train.total-steps", "20", "--train.eval-every", "10", "--train.batch-size", "4",
         "--train.warmup-steps", "2", "--train.device", "cpu"],
    )
    # traces labelled from a task file: calibrating on generated tasks instead is an error
    with pytest.raises(ConfigError, match="pass --cal-tasks FILE.jsonl"):
        run(replace(args, cal_tasks=None, out=str(tmp_path / "no-cal-tasks")))
    # traces whose manifests do not name their feature set: an error, not a guess
    unnamed = [_without_feature_set(tmp_path / d, tmp_path / f"{d}-unnamed")
               for d in ("train", "val")]
    with pytest.raises(ConfigError, match="no 'feature_set'") as err:
        run(replace(args, traces=str(unnamed[0]), val_traces=str(unnamed[1]),
                    out=str(tmp_path / "unnamed")))
    assert str(unnamed[0]) in str(err.value)
    card = run(args)
    assert card["calibration"]["fitted"] and card["calibration"]["score_scale"] > 0
    assert card["inputs"] == {"n_query_tokens": 8, "n_entry_features": 15,
                              "feature_set": "relative-lexical", "prior": None}
    assert card["train_traces"]["snapshots"] == 6 and card["task"] == "all"
    assert card["calibration"]["val_tasks"] == ["t0", "t1", "t2"]  # the --cal-tasks file's
    from lensnet.train import load_model
    from megacontext.cli import from_dict
    from sim.policies import LensNetPolicy, LensNetRank
    from sim.taskworld.scoring import answer_task

    lens = load_model(tmp_path / "lens" / "lensnet.pt")
    assert lens.score_scale == card["calibration"]["score_scale"]
    cal = card["calibration"]
    assert lens.score_gate == cal["gate"]  # the gate's rule on known NLLs: test_calibrate
    # the calibration's rank NLL is this checkpoint's order zooming on those very tasks
    world = from_dict(TaskWorldConfig, TraceReader(tmp_path / "train").meta["world"])
    prepared = [prepare_task(json.loads(x), oracle, CharTokenizer(512), world, features=False,
                             attention=True) for x in tasks.read_text().splitlines()]
    with torch.no_grad():
        rank_nll = np.mean([answer_task(LensNetRank(lens), pt, oracle, world)["answer_nll"]
                            for pt in prepared])
    assert cal["rank_answer_nll"] == pytest.approx(rank_nll, abs=1e-5)
    # --lensnets: a second checkpoint (every score raised by 50: it expands wherever it can)
    # under another name acts as that checkpoint, not as the --lensnet one
    other = tmp_path / "other.pt"
    ckpt = torch.load(tmp_path / "lens" / "lensnet.pt", weights_only=False)
    ckpt["model"]["head.bias"] += 50.0
    ckpt["calibration"] = {"score_scale": 1.0, "gate": "scale"}
    torch.save(ckpt, other)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            [*TINY_WORLD, "--lm", "tiny", "--tasks", str(tasks), "--out", str(out),
             "--policies", "lensnet,recency", "--lensnet", str(tmp_path / "lens" / "lensnet.pt"),
             "--lensnets", f"again={other}", "--no-progress", "--gister", "mean"]
        )
    assert exit_info.value.code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["policies"]["lensnet"]["n"] == 3
    rows = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    by = {(r["policy"], r["id"]): r for r in rows}
    assert {r["policy"] for r in rows} == {"lensnet", "recency", "again", "again_rank"}
    raised = load_model(other)
    own = {"lensnet": LensNetPolicy(lens), "again": LensNetPolicy(raised),
           "again_rank": LensNetRank(raised)}
    with torch.no_grad():
        for pt in prepared:
            for name, policy in own.items():
                want, got = answer_task(policy, pt, oracle, world), by[(name, pt.task["id"])]
                assert got["expands"] == want["expands"], (name, pt.task["id"])
                assert got["answer_nll"] == pytest.approx(want["answer_nll"], abs=1e-5)
    assert any(by[("again", i)]["answer_nll"] != by[("lensnet", i)]["answer_nll"]
               for i in ("t0", "t1", "t2"))  # the two checkpoints act apart
    # a checkpoint whose calibration chose the rank gate: `lensnet` acts as its `_rank` policy
    from lensnet.train import save_calibration

    shutil.copy(tmp_path / "lens" / "lensnet.pt", tmp_path / "ranked.pt")
    save_calibration(tmp_path / "ranked.pt", {**cal, "gate": "rank"})
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(
            [*TINY_WORLD, "--lm", "tiny", "--tasks", str(tasks), "--out", str(tmp_path / "ranked"),
             "--policies", "lensnet,lensnet_rank", "--lensnet", str(tmp_path / "ranked.pt"),
             "--lensnets", f"again={tmp_path / 'lens' / 'lensnet.pt'}", "--no-progress",
             "--gister", "mean"]
        )
    assert exit_info.value.code == 0
    # the cost per round is reported without recency in the run (any answer forward at W_max)
    results = json.loads((tmp_path / "ranked" / "results.json").read_text())
    summary = results["policies"]
    assert summary["lensnet"]["cost_vs_lm_forward"] > 0
    # lensnet_rank would repeat lensnet's rows: run once, and the results say so
    same = {"lensnet_rank": "lensnet", **({"again_rank": "again"} if cal["gate"] == "rank" else {})}
    assert results["config"]["same_as"] == same and not set(same) & set(summary)
    ranked = [json.loads(x) for x in (tmp_path / "ranked" / "tasks.jsonl").read_text().splitlines()]
    by = {(r["policy"], r["id"]): r for r in ranked}
    twin = "again" if cal["gate"] == "rank" else "again_rank"  # the same weights, rank-gated
    for (p, i), r in by.items():
        if p == "lensnet":
            assert (r["answer_nll"], r["expands"]) == (
                by[(twin, i)]["answer_nll"], by[(twin, i)]["expands"])
    for bad in ("recency=x.pt", "nameonly", f"again_rank={tmp_path / 'missing.pt'}"):
        with pytest.raises(SystemExit, match="--lensnets"):
            evaluate_main([*TINY_WORLD, "--lm", "tiny", "--tasks", str(tasks), "--out",
                           str(tmp_path / "bad"), "--policies", "recency", "--lensnets", bad])
    # the ablation without either task input trains on the same traces and reads neither (so
    # it needs no feature set named in their manifests)
    plain = replace(args, traces=str(unnamed[0]), val_traces=str(unnamed[1]),
                    out=str(tmp_path / "plain"), features=False, query=False, calibrate=False)
    card = run(plain)
    assert card["inputs"] == {"n_query_tokens": 0, "n_entry_features": 0, "feature_set": None,
                              "prior": None}
    assert load_model(tmp_path / "plain" / "lensnet.pt").config.n_entry_features == 0


def test_task_labeller_resumes_per_task_past_a_task_that_failed(tmp_path, oracle):
    """A task that cannot run writes nothing; a resumed run still labels every other task's covers
    exactly once (resume counts what is on disk per task, not snapshots)."""
    from megacontext.cli import parse

    tasks = tmp_path / "tasks.jsonl"
    bad = {**_task(tid="bad"), "question": "\n" + "Q" * 40}  # longer than the 24-token tail
    lines = [json.dumps(bad)] + [json.dumps(_task(at=20 + 30 * i, tid=f"t{i}")) for i in range(3)]
    tasks.write_text("\n".join(lines) + "\n")
    base = ["--lm", "tiny", "--tasks", str(tasks), "--covers", "3", "--query-tokens", "8"]
    base += ["--no-progress", "--gister", "mean", "--shard-size", "2", *TINY_WORLD]
    out = tmp_path / "tr"
    args = parse(TaskLabelArgs, [*base, "--out", str(out)])
    import sim.tasklabels as tl

    real, calls = tl.lensnet_item, []

    def crash_after_five(*a, **k):  # the labeller dies mid-task (after 2 full shards)
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    tl.lensnet_item = crash_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(args)
    finally:
        tl.lensnet_item = real
    assert len(TraceReader(out)) == 4  # two shards of two; the fifth snapshot was lost
    generate(args)
    r = TraceReader(out)
    ids = r.snapshots["doc_id"].tolist()
    assert sorted(ids) == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # doc 0 failed; the rest exactly once


def test_task_lensnet_training_is_deterministic_given_seed_and_machine(tmp_path):
    """Labelling the same tasks twice writes the same traces, and training on them twice (same seed)
    gives the same weights and calibration, bit for bit; another training seed gives other
    weights (so the comparison can fail). The pipeline of the prior LensNet: 'prior-lexical'
    features, the BM25 prior, calibrated on the scale gate only."""
    from megacontext.cli import parse
    from sim.tasktrain import TaskTrainArgs, run

    tasks = tmp_path / "tasks.jsonl"
    _write_tasks(tasks, 3)
    base = ["--lm", "tiny", "--tasks", str(tasks), "--covers", "2", "--query-tokens", "8"]
    base += ["--no-progress", "--gister", "mean", "--feature-set", "prior-lexical", *TINY_WORLD]
    for run_dir in ("a", "b"):
        generate(parse(TaskLabelArgs, [*base, "--out", str(tmp_path / run_dir / "train")]))
    generate(parse(TaskLabelArgs, [*base, "--out", str(tmp_path / "val"), "--labels", "exact"]))
    shards = sorted(p.name for p in (tmp_path / "a" / "train").glob("shard-*.safetensors"))
    assert shards
    for name in shards:
        a, b = (tmp_path / d / "train" / name for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), name

    def train(traces: str, out: str, seed: int) -> dict:
        args = parse(
            TaskTrainArgs,
            ["--traces", str(tmp_path / traces / "train"), "--val-traces", str(tmp_path / "val"),
             "--out", str(tmp_path / out), "--lm", "tiny", "--preset", "tiny", "--no-progress",
             "--cal-tasks", str(tasks), "--train.seed", str(seed),
             "--train.total-steps", "12", "--train.eval-every", "6", "--train.batch-size", "4",
             "--train.warmup-steps", "2", "--train.device", "cpu"],
        )
        card = run(args)
        return {"card": card, "state": torch.load(tmp_path / out / "lensnet.pt",
                                                  weights_only=False)["model"]}

    first, again, other = train("a", "l1", 0), train("b", "l2", 0), train("a", "l3", 1)
    card = first["card"]
    assert card["inputs"]["prior"] == "bm25" and card["inputs"]["feature_set"] == "prior-lexical"
    assert card["calibration"]["gate"] == "scale" and "rank_answer_nll" not in card["calibration"]
    assert "prior_gain" in first["state"]
    for key, value in first["state"].items():
        torch.testing.assert_close(value, again["state"][key], atol=0, rtol=0, msg=key)
    assert first["card"]["calibration"] == again["card"]["calibration"]
    assert any(not torch.equal(v, other["state"][k]) for k, v in first["state"].items())


def test_an_untrained_prior_lensnet_zooms_exactly_as_bm25(oracle):
    """The 'prior-lexical' LensNet before any training (calibration: scale 1) gives the allocator
    the BM25 baseline's scores, so every zoom round takes BM25's actions: LensNet's starting point
    is the strongest training-free selector, whatever it learns is added to it."""
    from sim.policies import BM25, LensNetPolicy
    from sim.taskworld.features import bm25_prior

    n_feat = keystore.n_entry_features(oracle.model.config.num_hidden_layers, "prior-lexical")
    cfg = LensNetConfig.tiny(oracle.d_model, block_size=4, n_entry_features=n_feat,
                             feature_set="prior-lexical", prior="bm25", n_query_tokens=16)
    torch.manual_seed(0)
    policy = LensNetPolicy(LensNet(cfg))
    rng = np.random.default_rng(0)
    words = "oak elm fir ash yew bay box".split()
    for i in range(3):
        filler = " ".join(rng.choice(words, 50))
        at = filler.index(" ", 40 + 60 * i)
        needle = " zq zq zq 4821."  # 4-character blocks: a whole 'zq' lies in one of them
        task = {"id": f"t{i}", "context": filler[:at] + needle + filler[at:],
                "question": " zq?", "answer": " 4821",
                "needle_spans": [[at + 1, at + len(needle)]]}
        pt = prepare_task(task, oracle, CharTokenizer(512), WORLD, features=False, attention=True)
        assert pt.block_lexical is not None and pt.block_lexical.max() > 0
        lens_wc, lens_counts = zoom(policy, pt, WORLD, oracle)
        bm25_wc, bm25_counts = zoom(BM25(), pt, WORLD, oracle)
        assert lens_counts["expands"] == bm25_counts["expands"] > 0
        assert lens_counts["rounds"] == bm25_counts["rounds"]
        np.testing.assert_array_equal(lens_wc.levels, bm25_wc.levels)
        np.testing.assert_array_equal(lens_wc.starts, bm25_wc.starts)
        # the feature column is the BM25 policy's score, and the score is that column
        item = lensnet_item(pt.wc, WORLD.n_tail_gists, 16, pt.question_attention(pt.wc, oracle),
                            "prior-lexical", pt.block_lexical, pt.query)
        prior = bm25_prior(pt.wc, pt.block_lexical)
        np.testing.assert_allclose(item["entry_features"][:, -1], prior, atol=1e-6)
        legal = (np.asarray(item["expand_cost"]) > 0) | (np.asarray(item["collapse_refund"]) > 0)
        assert legal.sum() > 10  # the scores of illegal directions are masked (the allocator's)
        np.testing.assert_allclose(policy.entry_scores(item)[legal], prior[legal], atol=1e-6)


def test_hybrid_labels_are_exact_on_their_candidates_and_zero_elsewhere(oracle):
    """The partial label (``label_snapshot`` with ``expand_slots`` / ``children``) against the full
    exact label of the same snapshot: the candidates' gains (their lookahead over every child, or
    over the named ones) and every collapse cost equal, every other gain is 0; the hybrid
    candidates are the cheap label's top gists with their best-relevance children."""
    from megacontext.labels import label_snapshot
    from sim.tasklabels import hybrid_candidates

    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False, attention=True,
                      answer_attention=True)
    wc, _ = zoom(NeedleFinder(), pt, WORLD, oracle)  # gists of both levels and tokens
    args = (wc, oracle, pt.answer_ids, wc.n_tokens, WORLD.n_tail_gists)
    full = label_snapshot(*args, lookahead=True)
    gain, _ = cheap_targets(wc, pt.answer_relevance)
    slots, children = hybrid_candidates(wc, gain, pt.answer_relevance, 3, 2)
    assert len(slots) == 3 and np.all(gain[slots] >= np.sort(gain[wc.can_expand()])[-3])
    b = wc.block_size
    every = {i: list(range(int(wc.indices[i]) * b, (int(wc.indices[i]) + 1) * b))
             for i in children}
    part = label_snapshot(*args, lookahead=True, expand_slots=slots, children=every)
    np.testing.assert_allclose(part["expand_gain"][slots], full["expand_gain"][slots], atol=1e-6)
    others = np.setdiff1d(np.arange(len(wc)), slots)
    assert np.all(part["expand_gain"][others] == 0) and full["expand_gain"][others].any()
    np.testing.assert_allclose(part["collapse_cost"], full["collapse_cost"], atol=1e-6)
    # the named children only: a lookahead over fewer children never exceeds the full one
    named = label_snapshot(*args, lookahead=True, expand_slots=slots, children=children)
    assert np.all(named["expand_gain"][slots] <= full["expand_gain"][slots] + 1e-6)
    for i, kids in children.items():
        rel = pt.answer_relevance[every[i][0] : every[i][-1] + 1]
        assert kids[0] == every[i][0] + int(np.argmax(rel))


def test_agreement_ranks_the_best_exact_expand_in_the_cheap_order(tmp_path):
    """``agreement`` on a constructed snapshot: the best exact expand (entry 3) is third in the
    cheap order (entries 1, 4, 3, ...): top1 False, top3 True, best_rank 3; the summary's
    ``best_in_cheap_top_k`` counts the snapshots a hybrid label of exact_top k would label."""
    from sim.tasklabels import agreement, agreement_summary

    exact = np.array([0.0, 0.1, 0.0, 0.9, 0.2, 0.0])
    cheap = np.array([0.0, 0.8, 0.1, 0.5, 0.7, 0.3])
    can_expand = np.array([False, True, True, True, True, True])
    a = agreement(exact, cheap, can_expand, can_expand)
    assert (a["top1"], a["top3"], a["best_rank"]) == (False, True, 3)
    rows = [{"task": "t", "cover": c, "kind": "k", "top1": r == 1, "top3": r <= 3,
             "best_rank": r, "spearman": 0.5, "exact_s": 1.0} for c, r in enumerate((1, 3, 5, 9))]
    _jsonl(tmp_path / "exact" / "agreement.jsonl", rows)
    _jsonl(tmp_path / "exact" / "cost.jsonl", [{"task": "t", "forward_s": 1.0, "covers": 4}])
    s = agreement_summary(tmp_path / "exact")
    assert s["best_in_cheap_top_k"] == {1: 0.25, 2: 0.25, 4: 0.5, 8: 0.75}


def test_drawn_label_tasks_record_the_lm_whose_tokenizer_counted_them(monkeypatch):
    """Tasks sim.tasklabels draws itself name the tokenizer that measured their lengths: the
    --lm given (a model folder too), 'chars' without a tokenizer; not 'smollm2' for any LM."""
    import sim.tasks.filler as filler
    from sim.tasklabels import TaskLabelArgs, _tasks

    monkeypatch.setattr(filler, "token_counter", lambda tok: lambda s: len(s) // 4)
    args = TaskLabelArgs(lm="models/my-llama", n_tasks=1, kinds=("passkey",), length=(512,))
    (task,) = _tasks(args, tokenizer=object())
    assert task["meta"]["tokenizer"] == "models/my-llama"
    (plain,) = _tasks(args, tokenizer=None)
    assert plain["meta"]["tokenizer"] == "chars"


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_best_block_against_a_loop_on_random_tilings(data):
    """``keystore.best_block``, the one home of an entry's best block, equals a loop over each
    span's blocks on random working-context tilings (whole-block gists of 1-3 blocks, single
    tokens, a trailing partial block), with leading axes."""
    b = data.draw(st.integers(2, 5))
    kinds = data.draw(st.lists(st.sampled_from(["tok", "g1", "g2", "g3"]), min_size=1, max_size=12))
    starts, ends, pos = [], [], 0
    for k in kinds:
        if k != "tok" and pos % b:  # a gist starts on a block boundary: finish the block first
            k = "tok"
        width = 1 if k == "tok" else b * int(k[1])
        starts.append(pos)
        ends.append(pos + width)
        pos += width
    n_blocks = -(-pos // b)  # the trailing partial block counts as one
    values = np.random.default_rng(data.draw(st.integers(0, 99))).random((2, n_blocks))
    got = keystore.best_block(values, np.array(starts), np.array(ends), b)
    spans = list(zip(starts, ends, strict=True))
    want = np.array([[row[s // b : (e - 1) // b + 1].max() for s, e in spans] for row in values])
    np.testing.assert_array_equal(got, want)
