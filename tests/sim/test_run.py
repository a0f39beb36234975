"""The main job: dataclass CLI (help from field docstrings, validation) and a small end-to-end
study."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from lensnet.train import load_model
from megacontext.cli import field_docs, parse
from megacontext.tree import TreeConfig
from sim.run import RunArgs, lm_defaults, run
from sim.streamworld.synthetic import SyntheticConfig
from sim.streamworld.world import HELD_OUT_FIRST_DOC


def test_help_comes_from_field_docstrings():
    assert field_docs(TreeConfig)["block_size"].startswith("b: children per node")
    out = subprocess.run(
        [sys.executable, "-m", "sim.run", "--help"], capture_output=True, text=True, check=True
    )
    assert "W_max: maximum number of entries" in out.stdout
    for flag in (
        "--seed",
        "--out",
        "--world.tree.block-size",
        "--world.w-max",
        "--world.allocator.n-diff",
        "--train.lr",
        "--train.betas",
        "--train-docs",
        "--eval-docs",
    ):
        assert flag in out.stdout, flag
    assert "(validation = 10% of the training documents" in " ".join(
        out.stdout.split()
    )  # a literal % survives


def test_nested_defaults_and_overrides(capsys):
    args = parse(RunArgs, [])
    assert (
        args.world.context.w_max == 256
        and args.world.tree.block_size == 32
        and args.train.total_steps == 1500
    )
    args = parse(
        RunArgs,
        [
            "--world.tree.block-size",
            "4",
            "--world.synthetic.block-size",
            "4",
            "--world.w-max",
            "400",
            "--train.betas",
            "0.8",
            "0.9",
            "--world.allocator.n-diff",
            "2",
        ],
    )
    assert (args.world.tree.block_size, args.train.betas, args.world.allocator.n_diff) == (
        4,
        (0.8, 0.9),
        2,
    )
    with pytest.raises(SystemExit) as exit_info:
        parse(RunArgs, ["--world.tree.block-size", "1"])  # refused by TreeConfig.__post_init__
    assert exit_info.value.code == 2  # argparse: a usage error naming the refused value
    assert "block_size must be >= 2, got 1" in capsys.readouterr().err


SMALL = {
    "--train-docs": 3,
    "--eval-docs": 2,
    "--preset": "tiny",
    "--world.tree.block-size": 4,
    "--world.tree.d-model": 8,
    "--world.synthetic.block-size": 4,
    "--world.synthetic.d-model": 8,
    "--world.synthetic.n-blocks": 40,
    "--world.synthetic.recent-window": 6,
    "--world.synthetic.n-recent": 3,
    "--world.step-tokens": 4,
    "--world.horizon": 8,
    "--world.n-tail-gists": 3,
    "--world.warmup-tokens": 16,
    "--world.w-max": 40,
    "--world.tail-tokens": 8,
    "--train.total-steps": 40,
    "--train.eval-every": 20,
    "--train.warmup-steps": 5,
    "--train.ckpt-every": 40,
}
"""The small synthetic study's options (a few seconds of CPU)."""


def small_study_argv(out, changes: dict | None = None, flags: tuple[str, ...] = ()) -> list[str]:
    """``sim.run``'s arguments for the small study into ``out``, with ``changes`` to ``SMALL``
    and extra ``flags``."""
    opts = {**SMALL, **(changes or {})}
    return [
        "--out",
        str(out),
        "--no-progress",
        *flags,
        *(str(x) for kv in opts.items() for x in kv),
        f"--world.synthetic.base-nll={SyntheticConfig().base_nll}",
    ]


def test_small_study_end_to_end(tmp_path, capsys):
    results = run(parse(RunArgs, small_study_argv(tmp_path)))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    pol = saved["policies"]
    assert set(pol) == {
        "lensnet",
        "lensnet_raw",
        "cue",
        "recency",
        "random",
        "all_coarse",
        "oracle",
    }
    assert pol["oracle"]["ngr"] == 1.0 and pol["recency"]["ngr"] == 0.0
    assert (
        pol["oracle"]["nll"] <= pol["recency"]["nll"] <= pol["all_coarse"]["nll"]
    )  # exact greedy beats doing nothing
    for r in pol.values():
        assert r["max_slots"] <= 40 and r["steps"] > 0
    assert saved["lensnet_metrics"]["legality_compliance"] == 1.0
    # the evaluated LensNet is the lowest-validation-loss checkpoint (--select best, the default)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val/loss" in r]
    assert saved["lensnet_select"] == "best" and len(evals) == 2
    assert saved["lensnet_step"] == min(evals, key=lambda r: r["val/loss"])["step"]
    for f in (
        "config.json",
        "command.txt",
        "versions.json",
        "metrics.jsonl",
        "latest.pt",
        "focus.jsonl",
        "plots/policy_nll.png",
        "plots/training_curves.png",
        "plots/focus_heatmap.png",
        "plots/validation_metrics.png",
        "plots/budget_sweep.png",
        "plots/score_distribution.png",
        "scores.npz",
    ):
        assert (tmp_path / f).exists(), f
    # the scale fitted on validation documents is reported, stored with the evaluated weights,
    # applied
    cal = saved["lensnet_calibration"]
    assert cal["score_scale"] in cal["grid"] and cal["val_nll"][
        cal["grid"].index(cal["score_scale"])
    ] == min(cal["val_nll"])
    assert all(d < HELD_OUT_FIRST_DOC for d in cal["val_docs"])  # never the held-out documents
    assert load_model(tmp_path / "best.pt").score_scale == cal["score_scale"]
    # budget sweep: the run's own W_max plus the feasible multiples, each with every policy
    sweep = saved["budget_sweep"]
    assert "40" in sweep and len(sweep) >= 2
    assert sweep["40"]["lensnet"]["nll"] == pol["lensnet"]["nll"]
    for b, pols in sweep.items():
        assert set(pols) == set(pol) and pols["oracle"]["ngr"] == 1.0
        assert pols["oracle"]["nll"] <= pols["recency"]["nll"] + 1e-12, b
    assert len(sweep) + len(saved["budget_notes"]) == 5  # every scale either ran or says why not
    # the focus log marks the referenced blocks (synthetic world)
    rec = json.loads((tmp_path / "focus.jsonl").read_text().splitlines()[0])
    assert rec["block_size"] == 4 and all(
        isinstance(r, int) and 0 <= r * 4 < rec["T"] for r in rec["referenced"]
    )
    printed = capsys.readouterr().out
    assert "lensnet" in printed and "NGR" in printed


def test_small_study_learns_to_beat_recency(tmp_path):
    """A small world LensNet can learn in seconds (orthonormal keys: d/2 = 16 >= 16 blocks): trained
    on 24 documents it must recover a clear share of the oracle's gap on held-out documents."""
    argv = small_study_argv(
        tmp_path,
        {"--train-docs": 48, "--eval-docs": 8, "--budget-scales": 1.25, "--world.tree.d-model": 32,
         "--world.synthetic.d-model": 32, "--world.synthetic.n-blocks": 16, "--world.w-max": 20,
         "--train.total-steps": 400, "--train.eval-every": 100, "--train.warmup-steps": 20,
         "--train.ckpt-every": 400},
        flags=("--no-plots",),
    )
    results = run(parse(RunArgs, argv))
    pol = results["policies"]
    assert pol["lensnet"]["ngr"] > 0.3, {k: v["ngr"] for k, v in pol.items()}  # 0.60 when written
    assert pol["cue"]["ngr"] > 0.7  # the past-only reference (0.89 when written)
    assert results["cue_metrics"]["ranking_accuracy"] > 0.9  # on the same held-out snapshots


def test_lm_study_end_to_end_with_the_tiny_lm(tmp_path):
    argv = [
        "--env",
        "lm",
        "--lm",
        "tiny",
        "--out",
        str(tmp_path),
        "--train-docs",
        "2",
        "--eval-docs",
        "1",
        "--preset",
        "tiny",
        "--no-progress",
        "--no-plots",
        "--world.tree.block-size",
        "4",
        "--world.tree.max-level",
        "2",
        "--world.synthetic.n-blocks",
        "24",
        "--world.step-tokens",
        "4",
        "--world.horizon",
        "8",
        "--world.n-tail-gists",
        "3",
        "--world.warmup-tokens",
        "16",
        "--world.w-max",
        "24",
        "--world.tail-tokens",
        "8",
        "--train.total-steps",
        "10",
        "--train.eval-every",
        "5",
        "--train.warmup-steps",
        "2",
        "--budget-scales",
        "1.5",
    ]
    args = parse(RunArgs, argv, defaults=lm_defaults())
    assert args.env == "lm" and args.world.env == "lm"
    results = run(args)
    assert (
        results["env"] == "lm"
    )  # the tiny LM has no GistNet checkpoint: means, and the name says why
    assert results["gister"].startswith("mean (no GistNet checkpoint fits")
    assert set(results["budget_sweep"]) == {"24", "36"}
    for r in results["policies"].values():
        assert r["max_slots"] <= 24 and r["steps"] > 0 and np.isfinite(r["nll"])
    assert results["policies"]["oracle"]["nll"] <= results["policies"]["recency"]["nll"] + 1e-6


def test_budget_sweep_skips_budgets_the_context_cannot_hold():
    from sim.run import _budgets

    args = parse(RunArgs, [])
    budgets, notes = _budgets(args, args.world)  # W_max 256, tail 128, b 32, L2: needs >= 191
    assert budgets == [256, 192, 224, 320]
    assert len(notes) == 1 and "W_max=160" in notes[0] and "191" in notes[0]
    lm = lm_defaults()
    budgets, notes = _budgets(lm, replace(lm.world, tree=replace(lm.world.tree, d_model=576)))
    assert budgets == [96, 144] and notes == []


def test_budgets_without_room_to_expand_are_flagged():
    """A budget where no expansion ever fits makes every policy the recency cover: said, not hidden.
    """
    from megacontext.working_context import min_slots
    from sim.run import _budgets, expansion_room

    lm = lm_defaults()
    w = lm.world
    b, n_doc = w.tree.block_size, w.synthetic.n_blocks * w.tree.block_size
    cursors = range(w.warmup_tokens, n_doc - w.horizon + 1, w.step_tokens)
    for w_max in (
        48,
        64,
        72,
        73,
        96,
    ):  # brute force: the coarsest cover + one block vs W_max, per step
        wb = replace(w, context=replace(w.context, w_max=w_max))
        want = sum(min_slots(t, b, 1, w.context.tail_tokens) + b - 1 <= w_max for t in cursors)
        assert expansion_room(wb) == (want, len(cursors))
    assert expansion_room(replace(w, context=replace(w.context, w_max=64)))[0] == 0
    args = replace(lm, budget_scales=(0.75, 2 / 3))  # 72: room until the last step; 64: never
    budgets, notes = _budgets(args, w)
    assert budgets == [96, 72, 64]
    assert any("W_max=72" in n and "only" in n for n in notes)
    assert any("W_max=64" in n and "no refocus step" in n and "recency" in n for n in notes)


def test_env_lm_brings_its_own_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "sim.run", "--env", "lm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    default = lm_defaults()
    assert (
        f"(default: {default.world.context.w_max})" in out.stdout
        and "(default: runs/lm)" in out.stdout
    )
    assert parse(RunArgs, []).world.context.w_max == 256
    from megacontext.tree import MegaContextTree
    from megacontext.working_context import WorkingContext

    w = default.world  # a valid focus loop (the context config checks its budget against the tree)
    wc = WorkingContext(MegaContextTree(w.tree), w.context)
    n = w.synthetic.n_blocks * w.tree.block_size
    wc.tree.ingest(np.zeros(n, dtype=np.int64), np.zeros((n, w.tree.d_model), np.float32))
    wc.append_tokens(n)


def test_bad_budget_exits_with_clear_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sim.run", "--world.w-max", "150", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "w_max=150" in out.stderr and "Traceback" not in out.stderr


def test_t_quantile_matches_the_tables():
    from sim.run import t_quantile

    for df, q in (
        (1, 12.7062),
        (2, 4.3027),
        (4, 2.7764),
        (9, 2.2622),
        (30, 2.0423),
        (1000, 1.9623),
    ):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4), df


def test_train_seeds_report_every_lensnet_and_a_t_interval(tmp_path, capsys):
    """--train-seeds 2: two LensNets on one set of traces and baselines; each reported, with the
    mean
    and the 95% t half-width (t_0.975 with 1 degree of freedom = 12.706)."""
    results = run(
        parse(
            RunArgs,
            [
                *small_study_argv(tmp_path),
                "--train-seeds",
                "2",
                "--no-plots",
                "--budget-scales",
                "1.25",
            ],
        )
    )
    s = results["lensnet_seeds"]
    assert s["seeds"] == [0, 1] and [r["seed"] for r in s["per_seed"]] == [0, 1]
    assert (
        s["per_seed"][0]["nll"] == results["policies"]["lensnet"]["nll"]
    )  # policies.lensnet: the first seed
    assert s["per_seed"][0]["ranking_accuracy"] == results["lensnet_metrics"]["ranking_accuracy"]
    assert s["per_seed"][0]["pearson"] != s["per_seed"][1]["pearson"]  # two different trainings
    for key in ("nll", "ngr", "ranking_accuracy", "pearson"):
        vals = np.array([r[key] for r in s["per_seed"]])
        summary = s["summary"][key]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(vals.mean())
        assert summary["half_width"] == pytest.approx(
            12.7062 * vals.std(ddof=1) / np.sqrt(2), rel=1e-4
        )
        assert summary["low"] <= summary["mean"] <= summary["high"]
    for r in s["per_seed"]:  # each seed's NGR against the shared baselines
        pol = results["policies"]
        assert r["ngr"] == pytest.approx(
            (pol["recency"]["nll"] - r["nll"]) / (pol["recency"]["nll"] - pol["oracle"]["nll"])
        )
        assert set(r["budget_sweep"]) == set(results["budget_sweep"])
    assert (tmp_path / "train-seeds" / "seed-1" / "metrics.jsonl").exists() and (
        tmp_path / "metrics.jsonl"
    ).exists()
    printed = capsys.readouterr().out
    assert "lensnet *" in printed and "over 2 training seeds [0, 1]" in printed


def test_dagger_round_labels_the_learned_focus_and_trains_on_both(tmp_path):
    """--dagger-docs: each seed's first round trains into round-1/; new training documents are
    labelled along that LensNet's own focus, one part per budget of the sweep; the second round
    starts from the first's weights and trains on both trace sets, validated on the first round's
    validation documents plus a tenth of the new ones (never a document either round trained on).
    """
    from megacontext.traces import TraceReader
    from sim.run import _with_dagger

    argv = small_study_argv(tmp_path, {"--dagger-docs": 6, "--dagger-steps": 20,
                                       "--budget-scales": 1.25}, flags=("--no-plots",))
    results = run(parse(RunArgs, argv))
    assert (tmp_path / "round-1" / "metrics.jsonl").exists()
    assert (tmp_path / "round-1" / "best.pt").exists() and (tmp_path / "best.pt").exists()
    round2 = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in round2) == 20  # the second round's own steps
    dagger = tmp_path / "traces" / "dagger-seed-0"
    budgets = [int(b) for b in results["budget_sweep"]]
    assert budgets == [40, 50]
    step_tokens = SMALL["--world.step-tokens"]
    for i, b in enumerate(budgets):
        part = TraceReader(dagger / f"part-{i}-of-2", require_complete=True)
        assert part.meta["world"]["context"]["w_max"] == b
        assert part.meta["behaviour"].startswith("lensnet seed 0")
        docs = set(part.snapshots["doc_id"].tolist())
        n = SMALL["--train-docs"]  # the new documents come after the training ones
        assert docs and all(n <= d < n + 6 and d % 2 == i for d in docs)
        assert max(len(part[j]["levels"]) for j in range(len(part))) <= b + step_tokens
    train = TraceReader(tmp_path / "traces" / "train")
    from lensnet.train import split_indices

    tr, va = split_indices(train.snapshots["doc_id"], 0.1, 0)
    both, tr2, va2 = _with_dagger(train, tmp_path / "traces" / "train", dagger, tr, va, 0)
    docs = both.snapshots["doc_id"]
    assert set(docs[va2]).isdisjoint(docs[tr2]) and set(docs[va]) <= set(docs[va2])
    assert len(tr2) + len(va2) == len(both) and results["train_snapshots"] == len(tr2)


@pytest.mark.parametrize(
    "cls, argv",
    [
        (
            "EvaluateArgs",
            [
                "--tasks",
                "a b.jsonl",
                "--no-progress",
                "--world.w-max",
                "128",
                "--no-world.lookahead",
                "--world.allocator.tau-expand",
                "0.1",
            ],
        ),
        (
            "TaskStudyArgs",
            ["--task", "code", "--train-lengths", "512", "1024", "--train.total-steps", "10"],
        ),
        ("RunArgs", ["--seed", "3", "--budget-scales", "1.0", "--world.w-max", "200"]),
    ],
)
def test_to_argv_parses_back_to_the_same_arguments(cls, argv):
    """The command a run writes (command.txt) reproduces its arguments, also when another entry
    point built them (sim.taskstudy calling sim.evaluate)."""
    import sim.evaluate
    import sim.run
    import sim.taskstudy
    from megacontext.cli import to_argv

    kind = next(getattr(m, cls) for m in (sim.evaluate, sim.run, sim.taskstudy) if hasattr(m, cls))
    args = parse(kind, argv)
    assert parse(kind, to_argv(args)) == args
    assert to_argv(kind()) == []


def test_one_spelling_of_w_max_and_the_tail_across_entry_points(capsys):
    """sim.run spells the working context's settings as sim.evaluate does (--world.w-max,
    --world.tail-tokens, --world.position-mode); the nested spelling still parses, with a note,
    and the written command uses the current one."""
    import sim.evaluate
    from megacontext.cli import to_argv

    new = parse(RunArgs, ["--world.w-max", "200", "--world.tail-tokens", "64",
                          "--world.position-mode", "centre"])
    capsys.readouterr()
    old = parse(RunArgs, ["--world.context.w-max", "200", "--world.context.tail-tokens", "64",
                          "--world.context.position-mode", "centre"])
    err = capsys.readouterr().err
    assert old == new and (new.world.context.w_max, new.world.context.tail_tokens) == (200, 64)
    assert "--world.context.w-max is spelt --world.w-max now" in err
    assert to_argv(new) == ["--world.w-max", "200", "--world.tail-tokens", "64",
                            "--world.position-mode", "centre"]
    ev = parse(sim.evaluate.EvaluateArgs, ["--world.w-max", "200", "--world.tail-tokens", "64"])
    assert (ev.world.w_max, ev.world.tail_tokens) == (200, 64)
    with pytest.raises(SystemExit):
        parse(RunArgs, ["--world.context.w-max"])  # a value is still required


def test_the_collapse_price_benchmark_reproduces_the_runs_lensnet_at_factor_one(tmp_path):
    """``benchmarks.collapse_price`` at c = 1 is the run's own calibrated LensNet: on the held-out
    documents at the run's W_max, the NGR ``sim.run`` reported; c < 1 makes collapses cheaper, so
    LensNet swaps at least as often; cue's scores on a level nowhere present change nothing."""
    from benchmarks.collapse_price import main as price

    results = run(parse(RunArgs, small_study_argv(tmp_path / "run", flags=("--no-plots",))))
    w_max = str(SMALL["--world.w-max"])
    got = price([str(tmp_path / "run"), "--factors", "1", "0.1", "--budgets", w_max, "--mixed",
                 "--levels", "1", "9", "--out-dir", str(tmp_path / "bench")])
    held = got["heldout"][w_max]
    assert held["c=1"]["ngr"] == pytest.approx(results["policies"]["lensnet"]["ngr"], abs=1e-9)
    assert held["c=0.1"]["swap_rate"] >= held["c=1"]["swap_rate"]
    assert {"expand lensnet / collapse cue", "expand cue / collapse lensnet"} <= set(held)
    # cue's scores on a level no entry stands at leave LensNet's own run
    assert held["cue on L9"]["ngr"] == held["c=1"]["ngr"] and "cue on L1" in held
    assert (tmp_path / "bench" / "collapse_price.json").exists()
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was
