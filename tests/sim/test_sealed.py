"""The sealed test split (DESIGN.md §11, "Blind evaluation"): ``python -m sim.tasks.sealed`` draws
the cells with their counts, lengths, kinds and uniform depths, reproducibly from its seed, once per
folder and never with a used seed; every command that trains, calibrates or selects refuses a
sealed file before doing any work, and ``sim.evaluate`` reads one only with ``--open-sealed``."""

import hashlib
import json
from types import SimpleNamespace

import pytest

import megacontext.lm
from megacontext.tree import ConfigError
from sim.tasks import approx_tokens
from sim.tasks.jsonl import SEALED_MANIFEST, is_sealed, read_tasks, refuse_sealed, write_jsonl
from sim.tasks.sealed import (
    DESIGNS,
    USED_SEEDS,
    SealedConfig,
    cell_configs,
    cell_seed,
    draw_sealed,
    main,
)

# tiny cells (the 'chars' counter: no tokenizer to load)
SIZES = {"passkey-2k": 4, "passkey-4k": 2, "multikey-2k": 3, "passkey-8k": 1, "code-2k": 2,
         "decoy-2k": 2}
TINY = ["--tokenizer", "chars", "--design", "families"]
CELLS = DESIGNS["families"]  # the split these tests draw
for _cell, _n in SIZES.items():
    TINY += [f"--{_cell}", str(_n)]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """One sealed split drawn by the command (seed 7)."""
    out = tmp_path_factory.mktemp("sealed") / "split"
    main(["--out", str(out), "--seed", "7", *TINY])
    return out


def test_draws_every_cell_with_its_count_length_kind_and_markers(split):
    manifest = json.loads((split / SEALED_MANIFEST).read_text())
    assert manifest["seed"] == 7 and manifest["n_tasks"] == sum(SIZES.values())
    assert manifest["command"].startswith("python -m sim.tasks.sealed ")
    assert "--seed 7" in manifest["command"] and manifest["note"]
    assert (split / "README.md").read_text().count("\n\n") == 0  # one paragraph
    assert manifest["design"] == "families" and set(manifest["cells"]) == set(CELLS)
    for cell, (kind, length, extra) in CELLS.items():
        path = split / f"{cell}.jsonl"
        tasks = read_tasks(path)
        entry = manifest["cells"][cell]
        assert len(tasks) == entry["n_tasks"] == SIZES[cell]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        cfg = entry["config"]
        assert all(cfg[k] == v for k, v in extra.items())
        assert (cfg["kind"], cfg["length"], cfg["split"], cfg["depths"]) == (
            kind,
            [length],
            "heldout",
            [],
        )
        for t in tasks:
            m = t["meta"]
            assert (m["kind"], m["length"], m["split"], m["seed"]) == (
                kind,
                length,
                "heldout",
                cfg["seed"],
            )
            assert m["sealed"] is True and m["eval_split"] == "test" and m["cell"] == cell
            # the whole stream fits the LM's positions (passkey-8k: SmolLM2's 8192)
            n = approx_tokens(t["context"] + t["question"]) + approx_tokens(t["answer"])
            assert n <= length
    seeds = [c["config"]["seed"] for c in manifest["cells"].values()]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(USED_SEEDS)


def test_depths_are_spread_uniformly_and_differ_between_cells(split):
    depths = {
        cell: [t["meta"]["depth"] for t in read_tasks(split / f"{cell}.jsonl")]
        for cell in ("passkey-2k", "passkey-4k", "multikey-2k")
    }
    assert all(0.0 <= d <= 1.0 for ds in depths.values() for d in ds)
    assert len(set(depths["passkey-2k"])) == len(depths["passkey-2k"])  # not one fixed depth
    # each cell draws from its own seed: the 2k and 4k pass keys share neither depths nor keys
    assert depths["passkey-2k"][:2] != depths["passkey-4k"]
    answers = {
        cell: {t["answer"] for t in read_tasks(split / f"{cell}.jsonl")}
        for cell in ("passkey-2k", "passkey-4k")
    }
    assert not answers["passkey-2k"] & answers["passkey-4k"]


def test_reproducible_from_the_seed(split, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    main(["--out", str(again), "--seed", "7", *TINY])
    main(["--out", str(other), "--seed", "8", *TINY])
    for cell in CELLS:
        assert (again / f"{cell}.jsonl").read_bytes() == (split / f"{cell}.jsonl").read_bytes()
        assert (other / f"{cell}.jsonl").read_bytes() != (split / f"{cell}.jsonl").read_bytes()
    assert cell_seed(7, "passkey-2k") == cell_seed(7, "passkey-2k") != cell_seed(8, "passkey-2k")


def test_refuses_a_folder_that_is_sealed_already(split):
    before = (split / "passkey-2k.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="already holds a sealed split"):
        main(["--out", str(split), "--seed", "9", *TINY])
    assert (split / "passkey-2k.jsonl").read_bytes() == before  # nothing redrawn


@pytest.mark.parametrize("seed", USED_SEEDS)
def test_refuses_a_used_seed(seed, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"seed {seed} was used"):
        SealedConfig(out=str(tmp_path), seed=seed)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--seed", str(seed), *TINY])
    assert f"seed {seed} was used" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_refuses_a_missing_seed(tmp_path):
    with pytest.raises(ConfigError, match="--seed N are required"):
        draw_sealed(SealedConfig(out=str(tmp_path)))


def test_is_sealed_follows_the_lines_and_the_folder(split, tmp_path):
    dev = tmp_path / "dev.jsonl"
    tasks = read_tasks(split / "passkey-2k.jsonl")
    write_jsonl(
        [{**t, "meta": {k: v for k, v in t["meta"].items() if k != "sealed"}} for t in tasks], dev
    )
    assert not is_sealed(dev)
    refuse_sealed(dev, "x")  # a dev file passes
    # a slice copied elsewhere stays sealed by its lines; any file beside SEALED.json is sealed
    write_jsonl([tasks[0]], tmp_path / "first1.jsonl")
    assert is_sealed(tmp_path / "first1.jsonl") and is_sealed(split / "anything.jsonl")
    assert not is_sealed(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------- every consumer refuses it
def _tasklabels(path, out):
    from sim.tasklabels import main as run

    run(["--tasks", str(path), "--out", str(out), "--lm", "tiny", "--no-progress"])


def _tasktrain_cal(path, out):
    from sim.tasktrain import main as run

    run(["--cal-tasks", str(path), "--out", str(out), "--lm", "tiny", "--no-progress"])


def _cheap_label_rule(path, out):
    from benchmarks.cheap_label_rule import main as run

    run(["--tasks", str(path), "--out", str(out), "--lm", "tiny"])


def _keystore(path, out, monkeypatch):
    import benchmarks.keystore as bench

    monkeypatch.setattr(bench, "TRAIN_FILES", (str(path),))
    bench.main([])


def _calibrate(path, out):
    from sim.calibrate import fit_task_calibration

    prepared = [SimpleNamespace(task=t) for t in read_tasks(path)]  # as taskworld prepares
    fit_task_calibration(lambda g: pytest.fail("calibrated"), prepared, None, None)


def _evaluate(path, out):
    from sim.evaluate import main as run

    run(["--tasks", str(path), "--out", str(out), "--lm", "tiny", "--no-progress"])


ENTRY_POINTS = {
    "sim.tasklabels": _tasklabels,
    "sim.tasktrain": _tasktrain_cal,
    "benchmarks.cheap_label_rule": _cheap_label_rule,
    "benchmarks.keystore": _keystore,
    "sim.calibrate": _calibrate,
    "sim.evaluate": _evaluate,
}


@pytest.mark.parametrize(
    ("name", "where"),
    [
        (name, where)
        for name in ENTRY_POINTS
        for where in ("line", "folder")
        if (name, where) != ("sim.calibrate", "folder")
    ],  # prepared tasks carry no folder
)
def test_every_training_calibration_or_selection_entry_point_refuses_it(
    name, where, split, tmp_path, monkeypatch
):
    """The sealed error comes before any work: no LM loaded, no output folder made. 'line': a
    slice of a sealed file copied elsewhere (meta.sealed); 'folder': the file beside SEALED.json
    (here without the marker in its lines)."""
    if where == "line":
        path = tmp_path / "copy.jsonl"
        write_jsonl(read_tasks(split / "passkey-2k.jsonl")[:2], path)
    else:
        path = split / "unmarked.jsonl"
        write_jsonl([{**t, "meta": {}} for t in read_tasks(split / "passkey-2k.jsonl")[:2]], path)
    monkeypatch.setattr(megacontext.lm, "load_lm", lambda *a, **k: pytest.fail("loaded the LM"))
    out = tmp_path / "out"
    call = ENTRY_POINTS[name]
    args = (path, out, monkeypatch) if name == "benchmarks.keystore" else (path, out)
    with pytest.raises((ConfigError, SystemExit)) as err:
        call(*args)
    assert "sealed test-split" in str(err.value)
    if name != "sim.calibrate":  # it takes prepared tasks (named by their ids), not a file
        assert str(path) in str(err.value) and not out.exists()


def test_tasktrain_refuses_traces_labelled_from_a_sealed_file(split, tmp_path, monkeypatch):
    """Traces whose manifest names a sealed task file (labelled before the guard) train nothing."""
    import megacontext.traces
    from sim.tasktrain import main as run

    class Reader:  # the manifest alone: the guard reads nothing else
        def __init__(self, path, require_complete=False):
            self.meta = {"tasks": str(split / "passkey-2k.jsonl")}

    monkeypatch.setattr(megacontext.traces, "TraceReader", Reader)
    monkeypatch.setattr(megacontext.lm, "load_lm", lambda *a, **k: pytest.fail("loaded the LM"))
    with pytest.raises(SystemExit, match="sealed test-split"):
        run(["--traces", "t", "--val-traces", "v", "--out", str(tmp_path / "o"), "--no-progress"])


def test_evaluate_reads_a_sealed_file_with_open_sealed_and_records_it(tmp_path):
    """--open-sealed lets the evaluation run, and results.json's config records the flag."""
    from sim.evaluate import main as run
    from tests.sim.test_taskworld import WORLD_ARGS, _task

    path = tmp_path / "sealed.jsonl"
    write_jsonl([{**_task(), "meta": {"sealed": True}}], path)
    world = [*WORLD_ARGS, "--policies", "recency"]
    with pytest.raises(SystemExit, match="sealed test-split"):
        run([*world, "--tasks", str(path), "--out", str(tmp_path / "closed")])
    with pytest.raises(SystemExit) as done:
        run([*world, "--tasks", str(path), "--out", str(tmp_path / "open"), "--open-sealed"])
    assert done.value.code == 0
    results = json.loads((tmp_path / "open" / "results.json").read_text())
    assert results["n_tasks"] == 1 and results["config"]["args"]["open_sealed"] is True


def test_the_templates_design_redraws_sealed_1_as_committed():
    """results/sealed-1 was drawn with the 'templates' design: its manifest's configs are what
    ``cell_configs`` gives for that design and seed (the first tasks redrawn byte for byte would
    need the SmolLM2 tokenizer; the configs pin every draw)."""
    from pathlib import Path

    from megacontext.cli import to_dict

    manifest = json.loads((Path("results/sealed-1") / SEALED_MANIFEST).read_text())
    config = SealedConfig(out="results/sealed-1", seed=None, design="templates")
    config.seed = manifest["seed"]  # a used seed: set after the check, to compare configs only
    sizes = {c: e["n_tasks"] for c, e in manifest["cells"].items()}
    for cell, n in sizes.items():
        setattr(config, cell.replace("-", "_"), n)
    got = json.loads(json.dumps({cell: to_dict(c) for cell, c in cell_configs(config).items()}))
    assert set(got) == set(DESIGNS["templates"]) == set(manifest["cells"])
    for cell, entry in manifest["cells"].items():
        want = entry["config"]
        assert {k: got[cell][k] for k in want} == want, cell


def test_the_default_design_is_the_templates():
    assert SealedConfig().design == "templates" and set(DESIGNS["templates"]) < set(SIZES)
