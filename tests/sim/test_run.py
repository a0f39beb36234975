"""The main job and its dataclass CLI: help from field docstrings, validation, a small end-to-end run."""

import json
import subprocess
import sys

import pytest

from sim.cli import field_docs, parse
from sim.run import RunArgs, run
from sim.tree import TreeConfig


def test_help_comes_from_field_docstrings():
    docs = field_docs(TreeConfig)
    assert docs["block_size"].startswith("b: children per node")
    out = subprocess.run([sys.executable, "-m", "sim.run", "--help"], capture_output=True, text=True, check=True)
    assert "--context.w-max" in out.stdout and "W_max: maximum number of entries" in out.stdout
    for f in ("--seed", "--tree.block-size", "--allocator.n-diff", "--context.position-mode"):
        assert f in out.stdout


def test_nested_defaults_and_overrides():
    args = parse(RunArgs, [])
    assert args.context.w_max == 256 and args.tree.block_size == 32
    args = parse(RunArgs, ["--tree.block-size", "4", "--context.w-max", "40", "--allocator.n-diff", "2"])
    assert (args.tree.block_size, args.context.w_max, args.allocator.n_diff) == (4, 40, 2)
    with pytest.raises(SystemExit):
        parse(RunArgs, ["--tree.block-size", "1"])  # refused by TreeConfig.__post_init__


def test_small_run_end_to_end(tmp_path, capsys):
    args = parse(RunArgs, ["--n-tokens", "600", "--tree.block-size", "4", "--tree.max-level", "3", "--context.w-max", "40",
                           "--context.tail", "8", "--print-every", "5", "--out", str(tmp_path)])
    summary = run(args)
    assert summary["invariant_checks"] == summary["steps"] == -(-600 // 32)
    assert summary["final_slots"] <= 40 and sum(summary["final_levels"]) == summary["final_slots"]
    assert summary["expand"] > 0 and summary["budget_collapses"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["context"]["w_max"] == 40
    assert "all invariants held" in capsys.readouterr().out


def test_bad_budget_exits_with_clear_message():
    out = subprocess.run([sys.executable, "-m", "sim.run", "--context.w-max", "64"], capture_output=True, text=True)
    assert out.returncode == 1 and "cannot hold the L0 tail" in out.stderr and "Traceback" not in out.stderr
