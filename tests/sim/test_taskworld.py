"""Task worlds (DESIGN §9): question-time zoom, baseline scores, sim.evaluate's contract and JSONL
errors, and a tiny labels -> train -> evaluate study with the random-init test LM."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle, answer_scores
from sim.policies import BM25, DenseRetrieval, Recency
from sim.policy import FocusPolicy
from sim.taskworld.features import relevance_scores
from sim.taskworld.scoring import focus_recall, needle_level
from sim.taskworld.world import CharTokenizer, TaskError, TaskWorldConfig, prepare_task, zoom
from tests.strategies import working_contexts

# b = 4, max_level 2: an L2 gist covers 16 characters (CharTokenizer: a token a character)
WORLD = TaskWorldConfig(
    block_size=4, max_level=2, w_max=64, tail_tokens=24, step_tokens=4, n_tail_gists=3
)
WORLD_ARGS = ["--world.block-size", "4", "--world.w-max", "64", "--world.tail-tokens", "24",
              "--world.step-tokens", "4", "--no-progress", "--lm", "tiny"]
"""``sim.evaluate``'s arguments for the tiny LM in WORLD's sizes (its default n_tail_gists)."""


def _task(n_filler: int = 200, at: int = 20, tid: str = "t0") -> dict:
    filler = "".join(chr(97 + (i * 7) % 26) for i in range(n_filler))
    needle = "K=4821;"  # 7 tokens: two L1 blocks (b = 4) from a block-aligned start
    context = filler[:at] + needle + filler[at:]
    return {
        "id": tid,
        "context": context,
        "question": "\nK?",
        "answer": " 4821",
        "needle_spans": [[at, at + len(needle)]],
    }


@pytest.fixture(scope="module")
def oracle():
    return LMOracle(tiny_llama())


class NeedleFinder(FocusPolicy):
    """Relevance 1 on the blocks holding the needle: what a perfect retriever would score."""

    name = "needle"

    def scores(self, view):
        pt, wc = view.task, view.wc
        b = wc.block_size
        rel = np.zeros(pt.n_tokens // b)
        rel[np.unique(np.flatnonzero(pt.needle) // b)] = 1.0
        return relevance_scores(wc, rel)


def test_zoom_needs_a_round_per_level(oracle):
    pt = prepare_task(_task(), oracle, CharTokenizer(512), WORLD, features=False)
    assert pt.wc.levels[0] == 2 and not focus_recall(pt, pt.wc)  # the needle sits under an L2 gist
    wc1, info1 = zoom(
        NeedleFinder(), pt, TaskWorldConfig(**{**WORLD.__dict__, "zoom_rounds": 1}), oracle
    )
    wc2, info2 = zoom(NeedleFinder(), pt, WORLD, oracle)  # rounds = max_level = 2
    assert info1["rounds"] == 1 and not focus_recall(pt, wc1)  # L2 -> L1 only: still a gist
    assert info2["rounds"] == 2 and focus_recall(pt, wc2)  # L2 -> L1 -> L0
    # needle_level: the highest level of an entry holding a needle token, by brute force
    for wc in (pt.wc, wc1, wc2):
        want = max(
            int(wc.levels[i])
            for t in np.flatnonzero(pt.needle)
            for i in range(len(wc))
            if wc.starts[i] <= t < wc.ends[i]
        )
        assert needle_level(pt, wc) == want
    assert (needle_level(pt), needle_level(pt, wc1), needle_level(pt, wc2)) == (2, 1, 0)
    assert len(wc2) <= WORLD.w_max and info2["expands"] >= 3
    # the shared question-time cover is untouched (every policy starts from it)
    assert not focus_recall(pt, pt.wc)
    wc3, info3 = zoom(Recency(), pt, WORLD, oracle)
    assert info3["expands"] == 0 and info3["rounds"] == 1
    np.testing.assert_array_equal(wc3.levels, pt.wc.levels)


def test_needle_mask_and_answer_ids(oracle):
    task = _task(at=37)
    pt = prepare_task(task, oracle, CharTokenizer(512), WORLD, features=True)
    s, e = task["needle_spans"][0]
    assert np.flatnonzero(pt.needle).tolist() == list(range(s, e))
    assert pt.question_tokens == len(task["question"]) and len(pt.answer_ids) == len(task["answer"])
    n_blocks = pt.n_tokens // WORLD.block_size
    assert pt.block_hidden.shape == (n_blocks, oracle.d_model) and pt.block_surprisal.shape == (
        n_blocks,
    )
    assert np.all(np.isfinite(pt.block_surprisal))


def _needle_rank(relevance: np.ndarray, pt) -> int:
    """1 + how many context blocks score above the best block that holds a needle token (blocks
    that reach into the question stand in the L0 tail at question time: they do not compete)."""
    b = pt.wc.block_size
    relevance = relevance[: (pt.n_tokens - pt.question_tokens) // b]
    blocks = np.unique(np.flatnonzero(pt.needle) // b)
    return int((relevance > relevance[blocks[blocks < len(relevance)]].max()).sum()) + 1


def test_dense_retrieval_ranks_a_planted_needle_first(oracle):
    """The question's own characters planted in random filler: a retriever that reads the question
    (not the filler before it) must rank the needle's block first, for every filler seed."""
    rng = np.random.default_rng(0)
    for seed in range(5):
        letters = np.random.default_rng(seed).integers(0, 20, 400)
        filler = "".join("abcdefghiklmnoprstu ."[i] for i in letters)
        at = 4 * int(rng.integers(5, 60))
        context = filler[:at] + "QXZJWVQXZJWV" + filler[at:]
        task = {
            "id": f"p{seed}",
            "context": context,
            "question": "\nQXZJWV",
            "answer": " 1",
            "needle_spans": [[at, at + 12]],
        }
        pt = prepare_task(
            task, oracle, CharTokenizer(512), replace(WORLD, tail_tokens=32), features=True
        )
        assert pt.query_text == "\nQXZJWV" and pt.query_hidden.shape == (oracle.d_model,)
        assert _needle_rank(DenseRetrieval().relevance(pt), pt) == 1, seed


def test_bm25_ranks_the_needle_first_on_real_text(oracle):
    """Held-out passkey tasks on real filler (their question shares words with the key's sentence):
    BM25 over the blocks' text ranks a needle block first."""
    from sim.tasks import TaskConfig, generate_tasks

    world = TaskWorldConfig(
        block_size=32, max_level=2, w_max=200, tail_tokens=96, step_tokens=32, n_tail_gists=3
    )
    tasks = generate_tasks(
        TaskConfig(
            kind="passkey",
            n_tasks=4,
            length=(800,),
            depths=(0.2, 0.5, 0.8),
            split="heldout",
            seed=1,
        )
    )
    for task in tasks:
        pt = prepare_task(task, oracle, CharTokenizer(512), world, features=False)
        assert pt.query_text == task["question"]
        assert pt.block_text[0] == task["context"][:32] and len(pt.block_text) == pt.n_tokens // 32
        assert _needle_rank(BM25().relevance(pt), pt) == 1, task["id"]


def test_task_errors_name_the_task(oracle):
    with pytest.raises(TaskError, match="longer than the L0 tail"):
        prepare_task({**_task(), "question": "?" * 40}, oracle, CharTokenizer(512), WORLD)
    # past the LM's 4096 positions only what reads the whole stream at once is refused (the
    # faithful mode streams it: tests/sim/test_long_streams.py)
    with pytest.raises(TaskError, match="4096 positions: the full read cannot run"):
        prepare_task(_task(n_filler=5000), oracle, CharTokenizer(512),
                     replace(WORLD, read_mode="full-read"), attention=True)


@settings(max_examples=30, deadline=None)
@given(wc=working_contexts(), data=st.data())
def test_relevance_scores_rank_gists_by_their_best_block(wc, data):
    b = wc.block_size
    n_blocks = wc.n_tokens // b
    rel = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=n_blocks, max_size=n_blocks)))
    u = relevance_scores(wc, rel)
    for i in range(len(wc)):
        lo, hi = int(wc.starts[i]) // b, (int(wc.ends[i]) - 1) // b
        want = max(
            [*rel[lo : min(hi, n_blocks - 1) + 1].tolist(), *([1.0] if hi >= n_blocks else [])]
        )
        assert u[i] == pytest.approx(want if wc.levels[i] >= 1 else -want, abs=1e-5)


def test_answer_scores_match_a_plain_forward(oracle):
    import torch

    ids = np.random.default_rng(0).integers(0, 512, 40)
    nll, em = answer_scores(oracle, None, ids[30:], prefix_ids=ids[:30])
    with torch.no_grad():
        logits = oracle.model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
    ref = torch.nn.functional.cross_entropy(logits[29:39], torch.as_tensor(ids[30:])).item()
    assert nll == pytest.approx(ref, abs=1e-4)
    assert em == bool(torch.equal(logits[29:39].argmax(-1), torch.as_tensor(ids[30:])))


def test_evaluate_contract_and_bad_lines(tmp_path, oracle):
    from sim.evaluate import format_results, main
    from sim.taskworld.scoring import answer_task

    path = tmp_path / "tasks.jsonl"
    lines = [
        json.dumps(_task(tid="a")),
        "{not json",
        json.dumps(_task(n_filler=5000, tid="long")),
        json.dumps({**_task(tid="b"), "needle_spans": [[0, 10_000]]}),
        json.dumps(_task(at=90, tid="c")),
    ]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--tasks",
                str(path),
                "--out",
                str(out),
                "--policies",
                "recency,retrieval,full",
                *WORLD_ARGS,
            ]
        )
    assert exit_info.value.code == 1  # lines were skipped
    assert torch.is_grad_enabled()  # the evaluator turns gradients off only inside
    res = json.loads((out / "results.json").read_text())
    command = (out / "command.txt").read_text().split()
    assert (
        command[:3] == ["python", "-m", "sim.evaluate"]
        and "--tasks" in command
        and "--no-progress" in command
    )
    assert res["config"]["w_max"] == 64
    assert (
        res["n_tasks"] == 2
    )  # evaluated: the too-long task failed preparation and is an error, not a task
    assert format_results(res).startswith("W_max 64, 2 tasks")
    assert sorted(e["line"] for e in res["errors"]) == [2, 3, 4]  # bad JSON, too long, span outside
    # the 5k-token task: past the tiny LM's 4096 positions the faithful mode would stream it, but
    # this budget cannot hold its coarsest cover (named: the task, its line, what to change)
    assert any("'long'" in e["error"] and "line 3" in e["error"] and "w_max=64" in e["error"]
               for e in res["errors"])
    rows = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    for name in ("recency", "retrieval", "full"):  # each summary: the mean of its policy's rows
        own = [r for r in rows if r["policy"] == name]
        r = res["policies"][name]
        assert r["n"] == len(own) == 2
        for key in ("exact_match", "answer_nll", "focus_recall"):
            assert r[key] == pytest.approx(np.mean([x[key] for x in own])), (name, key)
    # each row against a computation of its own on the same task: recency's zoom and answer
    # (sim.taskworld.scoring.answer_task), and the full context's NLL from one plain forward over it
    world = TaskWorldConfig(block_size=4, w_max=64, tail_tokens=24, step_tokens=4)
    by = {(r["policy"], r["id"]): r for r in rows}
    for task in (_task(tid="a"), _task(at=90, tid="c")):
        pt = prepare_task(task, oracle, CharTokenizer(512), world, features=False)
        want = answer_task(Recency(), pt, oracle, world)
        got = by[("recency", task["id"])]
        assert got["answer_nll"] == pytest.approx(want["answer_nll"], abs=1e-5)
        assert (got["exact_match"], got["expands"]) == (want["exact_match"], want["expands"])
        n, h = len(pt.ids), len(pt.answer_ids)
        with torch.no_grad():
            ids = torch.as_tensor(np.concatenate([pt.ids, pt.answer_ids]))[None]
            logits = oracle.model(input_ids=ids).logits[0].float()
        ref = torch.nn.functional.cross_entropy(logits[n - 1 : n - 1 + h],
                                                torch.as_tensor(pt.answer_ids))
        assert by[("full", task["id"])]["answer_nll"] == pytest.approx(ref.item(), abs=1e-4)
    assert (
        res["policies"]["full"]["focus_recall"] == 1.0
        and res["policies"]["recency"]["focus_recall"] == 0.0
    )
    assert set(res["grid"]) == {"recency", "retrieval", "full"}
    from analysis.plots import draw_all

    assert [p.name for p in draw_all(out)] == ["exact_match_grid.png"]
    assert {(r["id"], r["policy"]) for r in rows} == {
        (t, p) for t in "ac" for p in ("recency", "retrieval", "full")
    }


def test_evaluate_refuses_lensnet_policies_without_a_lensnet(tmp_path):
    """No shipped LensNet fits the tiny LM: the default policies (lensnet, lensnet_rank among
    them) are an error naming both ways out, not a run with those policies silently dropped."""
    from sim.evaluate import DEFAULT_POLICIES, main

    assert {"lensnet", "lensnet_rank"} <= set(DEFAULT_POLICIES.split(","))
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(_task()) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--tasks", str(path), "--out", str(tmp_path / "run"), "--lm", "tiny",
              "--no-progress", "--world.block-size", "4", "--world.w-max", "64"])
    msg = str(exit_info.value.code)
    assert msg.startswith("error: --policies names lensnet, lensnet_rank")
    assert "pass --lensnet CKPT" in msg and "leave lensnet/lensnet_rank out of --policies" in msg
    assert not (tmp_path / "run" / "results.json").exists()


def test_tiny_study_labels_train_evaluate(tmp_path):
    from megacontext.traces import TraceReader
    from sim.taskstudy import main

    out = tmp_path / "study"
    main(
        [
            "--lm",
            "tiny",
            "--out",
            str(out),
            "--train-tasks",
            "2",
            "--eval-tasks",
            "1",
            "--train-lengths",
            "300",
            "--eval-lengths",
            "300",
            "--policies",
            "lensnet,recency,oracle",
            "--world.block-size",
            "4",
            "--world.w-max",
            "110",
            "--world.tail-tokens",
            "72",
            "--world.step-tokens",
            "4",
            "--train.total-steps",
            "4",
            "--train.eval-every",
            "2",
            "--train.ckpt-every",
            "2",
            "--train.warmup-steps",
            "1",
            "--preset",
            "tiny",
            "--stream-every",
            "30",
            "--horizon",
            "8",
            "--no-progress",
        ]
    )
    reader = TraceReader(out / "traces", require_complete=True)
    cursors = [int(reader[i]["n_tokens"]) for i in range(len(reader))]
    stream = [
        c for c in cursors if c == 120
    ]  # every 30 steps of K = 4, before the last tail's worth
    # + each task's zoom rounds, up to the first that changes nothing
    assert len(stream) == 2 and 2 + 2 <= len(reader) <= 2 + 2 * WORLD.rounds
    snap = reader[0]
    assert snap["baseline_nll"] > 0 and snap["action_mask"].any()
    study = json.loads((out / "study.json").read_text())
    assert set(study["results"]) == {"lensnet", "recency", "oracle"}
    assert study["card"]["lm_fingerprint"]["hidden_size"] == 64
    assert (out / "lensnet.pt").exists()


class DecoyThenNeedle(FocusPolicy):
    """Round 1: a decoy block looks best; round 2: the needle block does (its decoy worth ~0)."""

    name = "decoy"

    def __init__(self, decoy: int, needle: int) -> None:
        self.decoy, self.needle, self.round = decoy, needle, 0

    def scores(self, view):
        pt, wc = view.task, view.wc
        rel = np.zeros(pt.n_tokens // wc.block_size)
        rel[self.decoy if self.round == 0 else self.needle] = 1.0
        self.round += 1
        return relevance_scores(wc, rel)


def test_zoom_rounds_may_give_back_an_earlier_rounds_detail(oracle):
    # All L1 blocks, one free expansion's worth of slots: round 2 can open the needle only by
    # collapsing round 1's decoy again, which a stream-step cooldown would forbid.
    world = TaskWorldConfig(
        block_size=4,
        max_level=1,
        w_max=38,
        tail_tokens=8,
        step_tokens=4,
        n_tail_gists=3,
        zoom_rounds=2,
    )
    pt = prepare_task(_task(n_filler=100, at=40), oracle, CharTokenizer(512), world, features=False)
    assert pt.wc.free_slots() < 3  # no expand without a payer
    needle = int(np.flatnonzero(pt.needle)[0]) // 4
    wc, info = zoom(DecoyThenNeedle(decoy=2, needle=needle), pt, world, oracle)
    assert np.any((wc.starts == needle * 4) & (wc.levels == 0))  # the needle's first block at L0
    assert not np.any((wc.starts == 8) & (wc.levels == 0))  # the decoy (block 2) given back
    assert info["rounds"] == 2 and info["expands"] == 2 and info["collapses"] == 2


def test_gap_recovered_matches_the_formula_and_resamples_documents():
    from sim.evaluate import gap_recovered

    nll = {
        "recency": [3.0, 2.0, 4.0, 3.0],
        "oracle": [1.0, 1.5, 2.0, 1.0],
        "p": [2.0, 2.0, 2.0, 2.0],
    }
    groups = ["a", "a", "b", "b"]
    rows = [
        {"id": f"t{i}", "policy": name, "answer_nll": v[i], "group": groups[i]}
        for name, v in nll.items()
        for i in range(4)
    ]
    out = gap_recovered(rows, ["recency", "oracle", "p"])
    mean = {k: np.mean(v) for k, v in nll.items()}
    assert out["p"]["ngr"] == pytest.approx(
        (mean["recency"] - mean["p"]) / (mean["recency"] - mean["oracle"])
    )
    assert out["recency"]["ngr"] == 0.0 and out["oracle"]["ngr"] == 1.0 and out["p"]["ngr_n"] == 4
    # two documents: the bootstrap's extremes are each document alone (tasks of a document move
    # together)
    alone = sorted(
        (np.mean(nll["recency"][s]) - 2.0)
        / (np.mean(nll["recency"][s]) - np.mean(nll["oracle"][s]))
        for s in (slice(0, 2), slice(2, 4))
    )
    assert out["p"]["ngr_ci95"] == pytest.approx(alone)
    # rows of a policy the oracle did not score are left out; no oracle at all: no NGR
    assert (
        gap_recovered(
            [r for r in rows if not (r["policy"] == "oracle" and r["id"] == "t0")], ["p"]
        )["p"]["ngr_n"]
        == 3
    )
    assert gap_recovered([r for r in rows if r["policy"] != "oracle"], ["p"]) == {}
    # against full context (a run without the oracle): the same formula under its own keys, and a
    # skipped full row (a stream past the window) takes its task out
    full = [{**r, "policy": "full"} if r["policy"] == "oracle" else r for r in rows]
    full[[k for k, r in enumerate(full) if r["policy"] == "full"][0]] = {
        "id": "t0", "policy": "full", "skipped": "past the window"}
    vs_full = gap_recovered(full, ["p"], ref="full")["p"]
    kept = slice(1, 4)
    want = (np.mean(nll["recency"][kept]) - 2.0) / (
        np.mean(nll["recency"][kept]) - np.mean(nll["oracle"][kept]))
    assert vs_full["ngr_full"] == pytest.approx(want) and vs_full["ngr_full_n"] == 3
    assert "ngr" not in vs_full


@settings(max_examples=30, deadline=None)
@given(wc=working_contexts(), data=st.data())
def test_rank_scores_keep_each_kinds_order_on_the_heuristics_scale(wc, data):
    from sim.taskworld.features import rank_scores

    u = np.asarray(data.draw(st.lists(st.floats(-5, 5), min_size=len(wc), max_size=len(wc))))
    r = rank_scores(wc, u)
    gist = wc.levels >= 1
    assert np.all((r[gist] > -1e-5) & (r[gist] < 1 + 1e-5)) and np.all(
        (r[~gist] > -1 - 1e-5) & (r[~gist] < 1e-5)
    )
    for kind in (gist, ~gist):
        a, b = u[kind], r[kind]
        assert np.all(
            np.sign(np.subtract.outer(a, a)) * np.sign(np.subtract.outer(b, b)) >= 0
        )  # same order
    if gist.sum() > 1:
        assert r[gist].max() == pytest.approx(1.0, abs=1e-5)


def test_prepare_task_names_budget_errors_and_lets_bugs_through(oracle, monkeypatch):
    """Only the expected task-data error (no collapse restores the budget) becomes a TaskError,
    which
    sim.evaluate skips as a bad line; any other exception is a bug and must propagate."""
    import sim.taskworld.world as taskworld
    from megacontext.working_context import BudgetExhausted

    def exhausted(self, wc):
        raise BudgetExhausted("no legal collapse restores the budget")

    def bug(self, wc):
        raise KeyError("a bug")

    monkeypatch.setattr(taskworld.FocusAllocator, "enforce_budget", exhausted)
    with pytest.raises(TaskError, match="'t0'.*no legal collapse"):
        prepare_task(_task(), oracle, CharTokenizer(512), WORLD)
    monkeypatch.setattr(taskworld.FocusAllocator, "enforce_budget", bug)
    with pytest.raises(KeyError, match="a bug"):
        prepare_task(_task(), oracle, CharTokenizer(512), WORLD)


def test_label_rounds_stop_when_a_round_changes_nothing(tmp_path, oracle):
    """As zoom does: once the oracle's scores move nothing, further rounds would write the same
    snapshot again."""
    from megacontext.allocator import AllocatorConfig
    from megacontext.traces import TraceReader
    from megacontext.tree import mean_gister
    from sim.taskstudy import label_tasks

    world = replace(
        WORLD, allocator=AllocatorConfig(tau_expand=1e9)
    )  # no expand clears the threshold
    assert world.rounds == 2
    meta = {
        "d_model": oracle.d_model,
        "n_tail": world.n_tail_gists,
        "block_size": world.block_size,
        "max_level": world.max_level,
    }
    part = label_tasks(
        [_task()],
        tmp_path / "traces",
        oracle,
        CharTokenizer(512),
        world,
        mean_gister,
        meta,
        progress=False,
    )
    assert len(TraceReader(part, require_complete=True)) == 1


def test_taskstudy_restores_grad_mode_and_records_its_own_arguments(tmp_path, monkeypatch):
    """command.txt is built from the study's arguments (not from the process's argv, which is
    another program's when run() is called from Python) and parses back into them; --label-only
    (or an error) leaves the caller's grad mode as it was."""
    import shlex

    from megacontext.cli import parse
    from sim.taskstudy import TaskStudyArgs, run

    monkeypatch.setattr("sys.argv", ["some-other-program", "--flag"])
    args = TaskStudyArgs(
        lm="tiny",
        out=str(tmp_path / "s"),
        train_tasks=1,
        eval_tasks=1,
        train_lengths=(300,),
        eval_lengths=(300,),
        label_only=True,
        progress=False,
        world=TaskWorldConfig(block_size=4, w_max=110, tail_tokens=72, step_tokens=4),
    )
    run(args)
    assert torch.is_grad_enabled()
    command = shlex.split((tmp_path / "s" / "command.txt").read_text())
    assert command[:3] == ["python", "-m", "sim.taskstudy"] and "--flag" not in command
    assert parse(TaskStudyArgs, command[3:]) == args


def test_evaluate_docstring_shows_only_options_it_takes(capsys):
    import re

    import sim.evaluate
    from megacontext.cli import parse

    with pytest.raises(SystemExit) as exit_info:
        parse(sim.evaluate.EvaluateArgs, ["--help"])
    assert exit_info.value.code == 0
    taken = set(re.findall(r"--[a-z][a-z0-9.-]*", capsys.readouterr().out))
    shown = set(re.findall(r"--[a-z][a-z0-9.-]*[a-z0-9]", sim.evaluate.__doc__))
    assert {"--world.w-max", "--tasks"} <= shown and shown <= taken, shown - taken


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_results_name_no_machine_folders():
    """Paths inside the project are recorded relative to its root; the committed held-out results
    hold no absolute path of the machine that ran them."""
    from pathlib import Path

    from sim.evaluate import PROJECT_ROOT, portable_path

    shipped = PROJECT_ROOT / "lensnet" / "checkpoints" / "lensnet-smollm2-tasks.pt"
    assert portable_path(shipped) == "lensnet/checkpoints/lensnet-smollm2-tasks.pt"
    assert portable_path("runs/x/lensnet.pt") == "runs/x/lensnet.pt" and portable_path(None) is None
    files = sorted(
        (Path(__file__).resolve().parents[2] / "results").glob("*/heldout*/results.json")
    )
    assert len(files) >= 4
    for f in files:
        absolute = [x for x in _strings(json.loads(f.read_text())) if x.startswith("/")]
        assert not absolute, (f, absolute)


# The real task world's budget (W_max 192, b 32, L2, R 64) on 2k and 4k streams: a needle that
# straddles two blocks, anywhere in the stream, must be fully openable within the zoom's rounds.
REAL = TaskWorldConfig()


def _real_task(n_tokens: int, at: int) -> dict:
    question = "\nWhat is the key?"  # 17 tokens (a character each), as SmolLM2's questions run
    filler = "".join(chr(97 + (i * 7) % 26) for i in range(n_tokens - len(question)))
    needle = "key=48213570;"  # 13 tokens starting 6 before a block boundary: two blocks
    return {
        "id": f"real-{n_tokens}-{at}",
        "context": filler[:at] + needle + filler[at + len(needle) :],
        "question": question,
        "answer": " 48213570",
        "needle_spans": [[at, at + len(needle)]],
    }


@pytest.mark.parametrize("n_tokens", [2008, 2040, 4001])
def test_a_straddling_needle_opens_fully_at_the_real_budget(oracle, n_tokens):
    """A perfect retriever's scores (relevance 1 on both needle blocks) must bring every needle
    token to L0 within W_max 192, wherever the needle lies: under an L2 gist (two levels to
    descend) or under an L1 gist of the newest, incomplete L2 node (whose L1 gists cannot
    collapse)."""
    b = REAL.block_size
    for at in range(b - 6, n_tokens - 3 * b, 7 * b):
        task = _real_task(n_tokens, at)
        pt = prepare_task(task, oracle, CharTokenizer(512), REAL, features=False)
        assert np.unique(np.flatnonzero(pt.needle) // b).size == 2
        wc, info = zoom(NeedleFinder(), pt, REAL, oracle)
        assert len(wc) <= REAL.w_max
        assert focus_recall(pt, wc), (n_tokens, at, needle_level(pt), info)
        assert pt.wc.config.tail_tokens == pt.question_tokens  # only the question is protected


def test_the_stream_tail_at_question_time_leaves_too_few_payers(oracle):
    """The ablation: keeping the stream's R = 64 protected at question time, the same perfect
    scores cannot open a needle that straddles two blocks under the first L2 gist of a 2k stream."""
    world = replace(REAL, question_tail=False)
    pt = prepare_task(_real_task(2008, 26), oracle, CharTokenizer(512), world, features=False)
    assert pt.wc.config.tail_tokens == world.tail_tokens
    wc, _ = zoom(NeedleFinder(), pt, world, oracle)
    assert needle_level(pt) == 2 and not focus_recall(pt, wc)


def test_compression_sweep_plots_the_runs_it_is_given(tmp_path):
    """Two sim.evaluate runs of the same tasks at two W_max: the sweep's table holds each run's
    numbers at its compression, full context included, and the PNG is written."""
    from analysis.plots import main as plots_main
    from sim.evaluate import main

    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(_task(at=at, tid=f"t{at}")) + "\n" for at in (20, 90)))
    world = ["--world.block-size", "4", "--world.tail-tokens", "24", "--world.step-tokens", "4"]
    world += ["--no-progress", "--lm", "tiny", "--tasks", str(path), "--policies", "recency,full"]
    runs = []
    for w_max in (64, 48):
        runs.append(tmp_path / f"w{w_max}")
        with pytest.raises(SystemExit) as exit_info:
            main([*world, "--world.w-max", str(w_max), "--out", str(runs[-1])])
        assert exit_info.value.code == 0
    plots_main(["--sweep", str(tmp_path / "sweep"), *map(str, runs)])
    table = json.loads((tmp_path / "sweep" / "compression_sweep.json").read_text())
    assert (tmp_path / "sweep" / "compression_sweep.png").exists()
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        (pt,) = [p for p in table["recency"] if p["w_max"] == res["config"]["w_max"]]
        assert pt["exact_match"] == res["policies"]["recency"]["exact_match"]
        assert pt["compression"] == pytest.approx(210 / res["config"]["w_max"], rel=0.05)
    assert set(table) == {"recency", "full"}
    # the same sweep from one run (--w-max-sweep): features once, the same numbers per W_max
    with pytest.raises(SystemExit) as exit_info:
        main([*world, "--world.w-max", "64", "--w-max-sweep", "48", "64", "--out",
              str(tmp_path / "one")])
    assert exit_info.value.code == 0
    one = json.loads((tmp_path / "one" / "sweep" / "compression_sweep.json").read_text())
    assert sorted(p["w_max"] for p in one["recency"]) == [48, 64]
    for w_max, run in ((64, tmp_path / "one"), (48, tmp_path / "one" / "w-48")):
        res = json.loads((run / "results.json").read_text())
        alone = json.loads((tmp_path / f"w{w_max}" / "results.json").read_text())
        assert res["config"]["w_max"] == w_max
        for key in ("exact_match", "answer_nll"):
            assert res["policies"]["recency"][key] == pytest.approx(
                alone["policies"]["recency"][key], abs=1e-5
            )
    # RUN1+RUN2: another run's policies of the same tasks at the same W_max join the curves
    for w_max in (64, 48):
        res = json.loads((tmp_path / f"w{w_max}" / "results.json").read_text())
        res["policies"] = {"later": res["policies"]["recency"]}
        (tmp_path / f"later{w_max}").mkdir()
        (tmp_path / f"later{w_max}" / "results.json").write_text(json.dumps(res))
    plots_main(["--sweep", str(tmp_path / "merged"),
                *(f"{tmp_path / f'w{w}'}+{tmp_path / f'later{w}'}" for w in (64, 48))])
    merged = json.loads((tmp_path / "merged" / "compression_sweep.json").read_text())
    assert set(merged) == {"recency", "full", "later"} and merged["later"] == merged["recency"]
    with pytest.raises(ValueError, match="W_max"):
        plots_main(["--sweep", str(tmp_path / "bad"), f"{tmp_path / 'w64'}+{tmp_path / 'w48'}"])


def test_markdown_table_holds_each_runs_numbers(tmp_path, capsys):
    from analysis.tables import table

    res = {
        "policies": {
            "attention": {"n": 4, "exact_match": 0.75, "exact_match_ci95": [0.25, 1.0],
                          "answer_nll": 0.5, "focus_recall": 0.5},
            "recency": {"n": 4, "exact_match": 0.0, "answer_nll": 2.25, "focus_recall": None,
                        "ngr": 0.0, "ngr_ci95": [0.0, 0.0]},
        }
    }
    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / "results.json").write_text(json.dumps(res))
    lines = table([tmp_path / "run-a"]).splitlines()
    assert lines[0] == "| policy | run-a (full-read, pre-faithful) |"  # from before the mode
    assert lines[2] == "| attention | 3/4 [0.25, 1.00], 0.500, 0.50 |"
    assert lines[3] == "| recency | 0/4, 2.250, NGR 0.00 [0.00, 0.00] |"
    other = {"config": {"read_mode": "full-read"},
             "policies": {"lensnet": {**res["policies"]["attention"], "exact_match": 1.0,
                                      "cost_vs_lm_forward": 0.0431,
                                      "reread_vs_lm_forward": 0.5,
                                      "by_depth": {"edge": {"n": 1, "exact_match": 0.0},
                                                   "interior": {"n": 3, "exact_match": 1.0}}}}}
    (tmp_path / "run-b").mkdir()
    (tmp_path / "run-b" / "results.json").write_text(json.dumps(other))
    res["config"] = {"read_mode": "full-read"}  # run-a, as a full-read run of this code
    (tmp_path / "run-a" / "results.json").write_text(json.dumps(res))
    merged = table([f"both={tmp_path / 'run-a'}+{tmp_path / 'run-b'}"]).splitlines()
    assert merged[0] == "| policy | both (full-read) |"  # every figure names its read mode
    assert merged[4] == "| lensnet | 4/4 [0.25, 1.00], 0.500, 0.50, cost 0.043 + re-read 0.50 |"
    # runs of different read modes never share a column
    (tmp_path / "run-f").mkdir()
    (tmp_path / "run-f" / "results.json").write_text(
        json.dumps({**other, "config": {"read_mode": "faithful"}}))
    with pytest.raises(SystemExit, match="columns of their own"):
        table([f"x={tmp_path / 'run-f'}+{tmp_path / 'run-b'}"])
    edges = table([f"both={tmp_path / 'run-a'}+{tmp_path / 'run-b'}"], edges=True).splitlines()
    assert edges[2] == "| attention | – |" and edges[4] == "| lensnet | 0/1 / 3/3 |"
    renamed = table([f"x={tmp_path / 'run-a'}+{tmp_path / 'run-b'}#-abl"]).splitlines()
    assert renamed[4].startswith("| lensnet-abl | 4/4 ")
    # a seed row pools training seeds: mean exact match, each seed's count, mean NLL and recall
    seeds = {"policies": {
        "lensnet": {"n": 4, "exact_match": 0.75, "answer_nll": 0.5, "focus_recall": 0.5},
        "seed1": {"n": 4, "exact_match": 0.25, "answer_nll": 1.5, "focus_recall": 0.25},
    }}
    (tmp_path / "run-s").mkdir()
    (tmp_path / "run-s" / "results.json").write_text(json.dumps(seeds))
    rows = table([tmp_path / "run-s", tmp_path / "run-a"],
                 {"lensnet (2 seeds)": ["lensnet", "seed1"]}).splitlines()
    assert rows[-1] == "| lensnet (2 seeds) | 0.50 (3, 1 /4), 1.000, 0.38 | – |"
    # the command line: seed rows parsed, a bad seed spec or a folder without results named
    from analysis.tables import main

    main([str(tmp_path / "run-s"), "--seeds", "pooled=lensnet,seed1"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("| pooled | 0.50 (3, 1 /4)")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run-s"), "--seeds", "no-members"])
    assert exit_info.value.code == 2  # argparse: a usage error
    assert "expected ROW=POLICY1,POLICY2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no-such-run"):
        main([str(tmp_path / "no-such-run")])
