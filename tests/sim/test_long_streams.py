"""Streams past the LM's window (issue 30): a tiny LM with a 256-position window streams 4k tokens
through a working context of at most 128 slots in the faithful mode; no forward ever asks for a
position at or past 256 (the oracle's guard would raise), every focus policy answers, the full
context says why it cannot run, and what reads the whole stream at once refuses loudly."""

import numpy as np
import pytest

from megacontext.lm import tiny_llama
from megacontext.lm_oracle import LMOracle
from sim.evaluate import summarise
from sim.policies import BM25, Attention, FullContext, Recency
from sim.taskworld.scoring import answer_task
from sim.taskworld.world import CharTokenizer, TaskError, TaskWorldConfig, prepare_task

WINDOW = 256
LONG = TaskWorldConfig(block_size=4, max_level=3, w_max=128, tail_tokens=24, step_tokens=4,
                       n_tail_gists=3)


@pytest.fixture(scope="module")
def oracle():
    model = tiny_llama()
    model.config.max_position_embeddings = WINDOW
    return LMOracle(model)


def _long_task(n_chars: int = 4000, at: int = 1700) -> dict:
    rng = np.random.default_rng(0)
    words = "oak elm fir ash yew bay box".split()
    filler = " ".join(rng.choice(words, n_chars // 4))[:n_chars]
    at = filler.index(" ", at)
    needle = " zq zq zq 4821."
    return {"id": "long", "context": filler[:at] + needle + filler[at:], "question": " zq?",
            "answer": " 4821", "needle_spans": [[at + 1, at + len(needle)]]}


def test_a_stream_16_times_the_window_runs_faithfully_and_full_context_says_why_not(oracle):
    task = _long_task()
    pt = prepare_task(task, oracle, CharTokenizer(512), LONG, features=False, attention=True)
    assert pt.n_tokens > 15 * WINDOW and pt.window == WINDOW
    assert len(pt.wc) <= LONG.w_max and pt.read_cost["positions"] > pt.n_tokens
    rows = []
    for policy in (Recency(), BM25(), Attention(), FullContext()):
        r = answer_task(policy, pt, oracle, LONG)  # the guard raises on any position >= 256
        rows.append({"policy": policy.name, "id": task["id"], "n_tokens": pt.n_tokens,
                     "w_max": LONG.w_max, "length": pt.n_tokens, "depth": None, **r})
    full = rows[-1]
    assert set(full) >= {"skipped"} and "exceed the LM's 256 positions" in full["skipped"]
    assert all("answer_nll" in r and np.isfinite(r["answer_nll"]) for r in rows[:-1])
    assert rows[1]["expands"] > 0  # BM25 found the needle's block and opened it
    summary, _ = summarise(rows, ["recency", "bm25", "attention", "full"])
    assert summary["full"] == {"n": 0, "skipped": 1, "skipped_why": full["skipped"]}
    assert summary["bm25"]["n"] == 1


def test_what_reads_the_whole_stream_at_once_refuses_past_the_window(oracle):
    task = _long_task()
    with pytest.raises(TaskError, match="the full read cannot run"):
        prepare_task(task, oracle, CharTokenizer(512), LONG.__class__(
            **{**LONG.__dict__, "read_mode": "full-read"}), features=False, attention=True)
    with pytest.raises(TaskError, match="labelling reads the whole stream once"):
        prepare_task(task, oracle, CharTokenizer(512), LONG, features=False, attention=True,
                     answer_attention=True)
    # within the window nothing changes: no window recorded, full context runs
    short = _long_task(n_chars=200, at=80)
    pt = prepare_task(short, oracle, CharTokenizer(512), LONG, features=False, attention=True)
    assert pt.window is None and "answer_nll" in answer_task(FullContext(), pt, oracle, LONG)


def test_the_tree_and_key_store_grow_linearly_with_the_stream():
    """``benchmarks.long_stream``'s measurement at tiny sizes (the tiny LM, a stream past its 4096
    positions): the tree's and the store's bytes grow with the stream's length (ratio within 20 % of
    the length ratio), and the longer stream really is past the window."""
    from benchmarks.long_stream import one

    short, long = one(300, "tiny", 0), one(1200, "tiny", 0)
    assert not short["past_window"] and long["past_window"]
    ratio = long["n_tokens"] / short["n_tokens"]
    assert long["store_bytes"] / short["store_bytes"] == pytest.approx(ratio, rel=0.05)
    size = {k: r["tree_bytes"] + r["store_bytes"] for k, r in (("short", short), ("long", long))}
    grown = size["long"] / size["short"]
    assert 0.8 * ratio <= grown <= 1.2 * ratio
    for r in (short, long):  # one thread: the process's CPU time is about its wall time
        assert 0 < r["cpu_seconds"] <= 1.5 * r["seconds"] + 0.1


def test_centre_positions_run_within_the_window_and_refuse_past_it(oracle):
    """'centre' puts each entry at its span's centre in the stream: it runs where the stream fits
    the window (and the working context's positions are then those centres) and is refused by name
    past it, where only 'slot' can run."""
    from dataclasses import replace

    centre = replace(LONG, position_mode="centre")
    with pytest.raises(TaskError, match="position_mode 'centre'"):
        prepare_task(_long_task(), oracle, CharTokenizer(512), centre, features=False,
                     attention=True)
    short = _long_task(n_chars=200, at=80)
    pt = prepare_task(short, oracle, CharTokenizer(512), centre, features=False, attention=True)
    pos = pt.wc.arrays(0).position_ids
    assert pos[-1] > len(pt.wc) and np.all(np.diff(pos) > 0)  # stream positions, not slots
    assert np.isfinite(answer_task(BM25(), pt, oracle, centre)["answer_nll"])
    with pytest.raises(Exception, match="position_mode must be"):
        replace(LONG, position_mode="middle")


def test_the_length_curve_plots_each_run_at_its_length_and_leaves_out_what_could_not_run(tmp_path):
    """``analysis.plots --lengths``: one point per run and policy at the run's mean stream length;
    a policy skipped at a length (full context past the window, n 0) has no point there; runs at
    different W_max are refused."""
    import json

    from analysis.plots import main as plots_main

    def run(name: str, length: int, full_n: int, w_max: int = 128) -> str:
        d = tmp_path / name
        d.mkdir()
        full = ({"n": 0, "skipped": 3, "skipped_why": "past the window"} if not full_n else
                {"n": full_n, "exact_match": 1.0, "exact_match_ci95": [1.0, 1.0],
                 "compression": length / w_max, "answer_nll": 0.1})
        res = {"config": {"w_max": w_max}, "policies": {
            "bm25": {"n": 3, "exact_match": 2 / 3, "exact_match_ci95": [0.0, 1.0],
                     "compression": length / w_max, "answer_nll": 0.5},
            "full": full}}
        (d / "results.json").write_text(json.dumps(res))
        return str(d)

    short, long = run("short", 2048, 3), run("long", 16384, 0)
    plots_main(["--lengths", str(tmp_path / "plot"), short, long])
    table = json.loads((tmp_path / "plot" / "length_curve.json").read_text())
    assert (tmp_path / "plot" / "length_curve.png").exists()
    assert [p["length"] for p in table["bm25"]] == pytest.approx([2048, 16384])
    assert [p["length"] for p in table["full"]] == pytest.approx([2048])
    with pytest.raises(ValueError, match="differ in W_max"):
        plots_main(["--lengths", str(tmp_path / "p2"), short, run("other", 4096, 3, w_max=64)])
