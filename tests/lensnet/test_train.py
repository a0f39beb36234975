"""Training: overfitting a fixed batch, exact resume, schedule, augmentation determinism, errors,
the
validation split by document, and data-parallel training under torchrun against one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lensnet.data import AugmentConfig, TraceDataset, collate
from lensnet.losses import LensNetLoss
from lensnet.metrics import compute_metrics
from lensnet.model import LensNet, LensNetConfig
from lensnet.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_model,
    main,
    snapshot_metrics,
    split_indices,
)
from megacontext.traces import TraceReader
from megacontext.training import lr_factor
from megacontext.tree import ConfigError
from tests.lensnet.strategies import tiny_world
from tests.strategies import random_snapshot, write_random_traces


def test_small_lensnet_overfits_a_fixed_batch():
    rng = np.random.default_rng(0)
    batch = collate([random_snapshot(rng, n=n, d_model=8, learnable=False) for n in (12, 9, 16, 5)])
    torch.manual_seed(0)
    model = LensNet(LensNetConfig.small(8, block_size=4))
    loss_fn = LensNetLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(400):
        out = loss_fn(model(batch), batch)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    pred = model(batch)
    final = loss_fn(pred, batch)
    m = compute_metrics(pred, batch)
    # L_rank and L_budget have non-zero floors even for a perfect fit (softplus > 0; budget set by
    # the targets), so "loss -> near 0" means: L_reg -> 0 and L at most the loss of u = y itself.
    ideal = loss_fn(torch.where(batch["action_mask"], batch["target_utilities"], 0.0), batch)[
        "loss"
    ].item()
    assert final["L_reg"] < 0.02 and final["loss"].item() < ideal + 0.05, (first, ideal, final)
    assert m["ranking_accuracy"] > 0.97 and m["pearson"] > 0.99


def _trainer(tmp_path, traces, name, **kw):
    reader = TraceReader(traces)
    cfg = TrainConfig(
        lr=1e-3,
        batch_size=4,
        warmup_steps=3,
        total_steps=12,
        eval_every=4,
        ckpt_every=6,
        seed=3,
        device="cpu",
        **kw,
    )
    train = TraceDataset(reader, np.arange(12), augment=AugmentConfig(), seed=3)
    val = TraceDataset(reader, np.arange(12, 16))
    mcfg = LensNetConfig(
        d_model=8, d_lens=16, n_heads=2, n_stacks=1, dropout=0.1, block_size=4
    )  # dropout: RNG matters
    return Trainer(mcfg, cfg, train, val, tmp_path / name, progress=False)


def test_evaluate_keeps_the_callers_mode(tmp_path):
    """snapshot_metrics() runs in eval mode and leaves the model as it found it (a model in eval
    mode, e.g.
    for a final report, must not come back with dropout on)."""
    traces = tmp_path / "traces"
    write_random_traces(traces, n_snapshots=16, d_model=8)
    trainer = _trainer(tmp_path, traces, "run")
    for training in (False, True):
        trainer.model.train(training)
        val = snapshot_metrics(
            trainer.model, trainer.loss_fn, trainer.val_set, 4, torch.device("cpu")
        )
        assert trainer.model.training is training and np.isfinite(val["val/loss"])


def test_resume_equals_uninterrupted(tmp_path):
    traces = tmp_path / "traces"
    write_random_traces(traces, n_snapshots=16, d_model=8)
    full = _trainer(tmp_path, traces, "full")
    full.train()
    part = _trainer(tmp_path, traces, "part")
    part.train(until=6)  # stops right after the step-6 checkpoint
    resumed = _trainer(tmp_path, traces, "part")
    resumed.resume(tmp_path / "part" / "step-0000006.pt")
    resumed.train()
    for (k, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    log = [
        json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == list(range(1, 13))
    for key in ("loss/total", "loss/reg", "loss/rank", "loss/budget", "loss/illegal", "opt/lr"):
        assert all(key in r for r in log)
    evals = [r for r in log if "val/loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and "val/ranking_accuracy" in evals[-1]
    assert (tmp_path / "full" / "best.pt").exists() and (tmp_path / "full" / "latest.pt").exists()
    model = load_model(tmp_path / "full" / "latest.pt")
    assert isinstance(model, LensNet) and not model.training


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))


def test_augmentation_is_seeded_per_item(tmp_path):
    write_random_traces(tmp_path, n_snapshots=8, d_model=8)
    reader = TraceReader(tmp_path)
    aug = AugmentConfig(jitter_p=0.5, noise_p=0.5)
    a, b = TraceDataset(reader, augment=aug, seed=1), TraceDataset(reader, augment=aug, seed=1)
    for i in (5, 2, 7):  # different access orders, same items
        np.testing.assert_array_equal(a[i]["target_utilities"], b[i]["target_utilities"])
    plain = TraceDataset(reader)
    changed = sum(
        a[i]["levels"].shape != plain[i]["levels"].shape
        or not np.array_equal(a[i]["target_utilities"], plain[i]["target_utilities"])
        for i in range(8)
    )
    assert changed > 0


def test_clear_errors(tmp_path):
    write_random_traces(tmp_path / "t", n_snapshots=4, d_model=8)
    reader = TraceReader(tmp_path / "t")
    with pytest.raises(ConfigError, match="d_model=8 but the LensNet config expects d_model=16"):
        Trainer(
            LensNetConfig.tiny(16),
            TrainConfig(device="cpu"),
            TraceDataset(reader),
            None,
            tmp_path / "o",
        )
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="bad.pt: unreadable"):
        load_checkpoint(bad)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


def _write_traces_of_documents(path, *, n_snapshots: int, n_docs: int, d_model: int = 8) -> None:
    """Random snapshots, snapshot i from document i % n_docs."""
    from megacontext.traces import TraceWriter

    rng = np.random.default_rng(0)
    w = TraceWriter(
        path, {"d_model": d_model, "n_tail": 3, "block_size": 4, "max_level": 2}, shard_size=4
    )
    for i in range(n_snapshots):
        w.add(
            {
                **random_snapshot(rng, n=int(rng.integers(3, 13)), d_model=d_model),
                "doc_id": np.int64(i % n_docs),
            }
        )
    w.close()


def test_cli_end_to_end(tmp_path, capsys):
    _write_traces_of_documents(tmp_path / "t", n_snapshots=20, n_docs=5)
    main(
        [
            "--traces",
            str(tmp_path / "t"),
            "--out",
            str(tmp_path / "o"),
            "--preset",
            "tiny",
            "--train.total-steps",
            "6",
            "--train.eval-every",
            "3",
            "--train.warmup-steps",
            "2",
            "--train.batch-size",
            "4",
            "--train.device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert "val/ranking_accuracy" in json.loads(printed[printed.index("{") :])
    assert (tmp_path / "o" / "latest.pt").exists()
    ckpt = load_checkpoint(tmp_path / "o" / "latest.pt")
    assert ckpt["step"] == 6 and ckpt["train_config"]["batch_size"] == 4


def test_validation_split_is_by_document(tmp_path):
    from sim.labels import TraceArgs, generate_traces

    reader = TraceReader(
        generate_traces(
            TraceArgs(out=str(tmp_path), n_docs=5, seed=0, world=tiny_world(), progress=False)
        )
    )
    docs = reader.snapshots["doc_id"]
    for seed in range(4):
        train, val = split_indices(docs, 0.4, seed)
        assert not set(docs[train]) & set(docs[val]), "a document in both splits"
        assert len(set(docs[val])) == 2 and np.array_equal(
            np.sort(np.concatenate([train, val])), np.arange(len(docs))
        )
        assert np.array_equal(np.sort(train), train) and np.array_equal(np.sort(val), val)
    np.testing.assert_array_equal(
        split_indices(docs, 0.4, 1)[1], split_indices(docs, 0.4, 1)[1]
    )  # seeded
    assert (
        len({tuple(split_indices(docs, 0.4, s)[1]) for s in range(8)}) > 1
    )  # and the seed matters
    assert (
        len(set(docs[split_indices(docs, 0.01, 0)[1]])) == 1
    )  # a positive fraction holds out >= 1 document
    assert split_indices(docs, 0.0, 0)[1].size == 0
    with pytest.raises(ConfigError, match="at least 2 documents"):
        split_indices(np.zeros(7, dtype=np.int64), 0.1, 0)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_indices(docs, 1.0, 0)


def _train_argv(traces, out, *extra: str) -> list[str]:
    return [
        "--traces",
        str(traces),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--val-fraction",
        "0.34",
        "--train.total-steps",
        "16",
        "--train.eval-every",
        "8",
        "--train.ckpt-every",
        "16",
        "--train.warmup-steps",
        "2",
        "--train.batch-size",
        "8",
        "--train.lr",
        "1e-3",
        "--train.device",
        "cpu",
        *extra,
    ]


def test_torchrun_data_parallel_follows_one_process(tmp_path, capsys):
    """Two gloo ranks, each on half of every global batch of 8, against one process on the whole
    batch. DDP averages the ranks' gradients, and each rank's loss terms are means over its own
    half,
    so one process with --train.loss-splits 2 (the same halves, normalised alike) must give the same
    parameters up to float rounding; one process with plain whole-batch means stays close."""
    from sim.labels import TraceArgs, generate_traces

    traces = generate_traces(
        TraceArgs(
            out=str(tmp_path / "traces"), n_docs=3, seed=0, world=tiny_world(), progress=False
        )
    )
    main(_train_argv(traces, tmp_path / "halves", "--train.loss-splits", "2"))
    main(_train_argv(traces, tmp_path / "whole"))
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lensnet.train",
            *_train_argv(traces, tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("val/ranking_accuracy") == 1  # rank 0 alone reports
    halves, ddp = (load_checkpoint(tmp_path / d / "latest.pt") for d in ("halves", "ddp"))
    torch.manual_seed(0)  # the initial parameters, as Trainer draws them
    init = LensNet(LensNetConfig(**ddp["model_config"])).state_dict()
    moved = torch.cat([(ddp["model"][k] - init[k]).flatten() for k in init])
    gap = torch.cat([(ddp["model"][k] - halves["model"][k]).flatten() for k in init])
    assert moved.norm() > 0.1 and gap.abs().max() < 1e-4, (moved.norm(), gap.abs().max())
    logs = {
        d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("ddp", "halves", "whole")
    }
    assert [r["step"] for r in logs["ddp"]] == list(range(1, 17))  # one writer
    for a, b in zip(logs["ddp"], logs["halves"], strict=True):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-4)
    for d in ("ddp", "whole"):  # both learn: validation loss falls from step 8 to 16
        evals = [r["val/loss"] for r in logs[d] if "val/loss" in r]
        assert len(evals) == 2 and evals[1] < evals[0], (d, evals)
    assert logs["ddp"][-1]["val/loss"] == pytest.approx(logs["whole"][-1]["val/loss"], rel=0.05)


def test_match_parameters_get_their_own_learning_rate(tmp_path):
    """``match_lr_scale`` puts every ``match_*`` parameter (and only those) in a group with lr x
    scale,
    and the schedule scales both groups alike."""
    write_random_traces(tmp_path / "tr", n_snapshots=16, d_model=8)
    reader = TraceReader(tmp_path / "tr")
    cfg = TrainConfig(
        lr=1e-3,
        batch_size=4,
        warmup_steps=2,
        total_steps=6,
        eval_every=3,
        device="cpu",
        match_lr_scale=10.0,
    )
    mcfg = LensNetConfig.tiny(8, block_size=4, match_form="full")
    t = Trainer(
        mcfg, cfg, TraceDataset(reader, np.arange(12)), None, tmp_path / "run", progress=False
    )
    names = {id(p): n for n, p in t.model.named_parameters()}
    base, match = t.opt.param_groups
    assert {names[id(p)] for p in match["params"]} == {
        n for n in names.values() if n.startswith("match_")
    }
    assert not any(names[id(p)].startswith("match_") for p in base["params"])
    assert len(base["params"]) + len(match["params"]) == len(names)
    t.train(until=3)
    assert match["lr"] == pytest.approx(10 * base["lr"]) and base["lr"] > 0
    with pytest.raises(ConfigError, match="match_lr_scale"):
        TrainConfig(match_lr_scale=0.0)


def test_best_checkpoint_by_a_named_metric_and_unknown_names_refused(tmp_path):
    """``select``: best.pt follows the highest ranking accuracy (not the lowest loss) when asked;
    a metric the validation does not report is an error, not a silent fallback to final.pt."""
    traces = tmp_path / "traces"
    write_random_traces(traces, n_snapshots=16, d_model=8)
    trainer = _trainer(tmp_path, traces, "acc", select="ranking_accuracy")
    trainer.train()
    log = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val/ranking_accuracy" in r]
    best = max(evals, key=lambda r: r["val/ranking_accuracy"])  # first of the maxima wins
    assert torch.load(tmp_path / "acc" / "best.pt", weights_only=False)["step"] == best["step"]
    with pytest.raises(ConfigError, match="no such metric"):
        _trainer(tmp_path, traces, "bad", select="ranking_acc").train()
