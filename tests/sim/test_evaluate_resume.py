"""``sim.evaluate --resume``: an interrupted run continues where it stopped, keeps what it measured,
reruns a task cut off between policies, and refuses a folder that holds another command's run or
a run over another version of the task file;
results.json names the read mode and the attention read's cost."""

import json

import pytest

from sim.evaluate import main
from tests.sim.test_taskworld import WORLD_ARGS as WORLD
from tests.sim.test_taskworld import _task


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]


def test_resume_continues_an_interrupted_run(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(_task(at=at, tid=f"t{at}")) + "\n" for at in (20, 60, 90)))
    args = [*WORLD, "--tasks", str(path), "--policies", "recency,attention"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run([*args, "--out", str(full)]) == 0
    assert _run([*args, "--out", str(part)]) == 0
    rows = _rows(part)
    # interrupted: the first task whole, the second cut off after its first policy
    (part / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (part / "results.json").unlink()
    assert _run([*args, "--out", str(part), "--resume"]) == 0
    again = _rows(part)
    assert [(r["id"], r["policy"]) for r in again] == [(r["id"], r["policy"]) for r in rows]
    assert again[:2] == rows[:2]  # the finished task is kept as measured, not rerun
    res, ref = (json.loads((d / "results.json").read_text()) for d in (part, full))
    assert res["n_tasks"] == ref["n_tasks"] == 3
    for name in ("recency", "attention"):
        for key in ("exact_match", "answer_nll", "n"):
            assert res["policies"][name][key] == pytest.approx(ref["policies"][name][key])
    assert res["config"]["read_mode"] == "faithful"
    cost = res["read_cost"]
    assert cost["mode"] == "faithful" and cost["tasks"] == 3
    assert cost["positions_per_token"] > 1.0  # each stream forward reads its working context
    assert "--resume" not in (part / "command.txt").read_text()
    # killed inside the first task: no task finished, the last line cut off mid-write; the
    # partial task runs again (it is not taken as finished with fewer policies)
    (part / "tasks.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:20])
    assert _run([*args, "--out", str(part), "--resume"]) == 0
    again = _rows(part)
    assert [(r["id"], r["policy"]) for r in again] == [(r["id"], r["policy"]) for r in rows]
    # another command's folder is refused, naming what to do
    with pytest.raises(SystemExit, match="holds another run"):
        main([*args, "--out", str(part), "--resume", "--world.w-max", "60"])
    # the same command over a changed task file (the same ids, other tasks) is refused too: its
    # kept rows would be of the old tasks
    assert (part / "tasks.sha256").read_text().split()[1] == str(path)
    moved = [_task(at=at + 5, tid=f"t{at}") for at in (20, 60, 90)]
    path.write_text("".join(json.dumps(t) + "\n" for t in moved))
    with pytest.raises(SystemExit, match="the task file changed"):
        main([*args, "--out", str(part), "--resume"])


def test_full_read_costs_one_position_per_token(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(_task()) + "\n")
    out = tmp_path / "run"
    assert _run([*WORLD, "--tasks", str(path), "--policies", "attention", "--out", str(out),
                 "--world.read-mode", "full-read"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["read_mode"] == "full-read"
    assert res["read_cost"]["positions_per_token"] == 1.0


def test_the_lensnets_training_read_mode_comes_from_its_card(tmp_path):
    """The shipped checkpoint's features were read in full (its card predates the faithful mode);
    a card that names its mode is taken at its word; no card, no claim."""
    from sim.evaluate import trained_read_mode

    assert trained_read_mode("lensnet/checkpoints/lensnet-smollm2-tasks.pt") == "full-read"
    (tmp_path / "new.json").write_text(json.dumps({"world": {"read_mode": "faithful"}}))
    assert trained_read_mode(str(tmp_path / "new.pt")) == "faithful"
    assert trained_read_mode(str(tmp_path / "none.pt")) is None


def test_a_run_grows_by_resuming_with_more_tasks(tmp_path):
    """--max-tasks N evaluates the file's first N tasks; resuming with a larger N keeps those rows
    and runs only the new tasks, the same rows as one run over them all; another change is
    refused."""
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(_task(at=at, tid=f"t{at}")) + "\n" for at in (20, 60, 90)))
    args = [*WORLD, "--tasks", str(path), "--policies", "recency,bm25"]
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    assert _run([*args, "--out", str(whole)]) == 0
    assert _run([*args, "--out", str(grown), "--max-tasks", "1"]) == 0
    first = _rows(grown)
    assert {r["id"] for r in first} == {"t20"}
    assert json.loads((grown / "results.json").read_text())["config"]["max_tasks"] == 1
    assert _run([*args, "--out", str(grown), "--max-tasks", "3", "--resume"]) == 0
    rows = _rows(grown)
    assert rows[:2] == first  # kept as measured
    ref = _rows(whole)
    assert [(r["id"], r["policy"], r["answer_nll"]) for r in rows] == [
        (r["id"], r["policy"], r["answer_nll"]) for r in ref
    ]
    assert json.loads((grown / "results.json").read_text())["n_tasks"] == 3
    assert "--max-tasks 3" in (grown / "command.txt").read_text()
    with pytest.raises(SystemExit, match="holds another run"):
        main([*args, "--out", str(grown), "--resume", "--max-tasks", "3", "--seed", "1"])
    with pytest.raises(SystemExit, match="max-tasks"):
        main([*args, "--out", str(tmp_path / "bad"), "--max-tasks", "-1"])
    # a run does not shrink: its summary would count tasks past the new N
    with pytest.raises(SystemExit, match="beyond the file's first 2"):
        main([*args, "--out", str(grown), "--max-tasks", "2", "--resume"])
