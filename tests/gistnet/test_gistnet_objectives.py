"""GistNet's content objectives and training path: each loss term falls under a few optimiser steps
on a fixed batch, the frozen LM's weights stay byte-identical, the batched substitution equals a
one-example-at-a-time reference, the corpus splits are disjoint, and ``resolve_gister('auto')``
never falls back to means silently."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from gistnet.corpus import SPLITS, pydoc_split, stdlib_modules, stdlib_split, stdlib_split_of
from gistnet.gister import (
    GistNetCheckpointError,
    GistNetFallbackWarning,
    GistNetGister,
    LMPrefix,
    lm_fingerprint,
    load_gistnet,
    resolve_gister,
    save_gistnet,
)
from gistnet.model import GistNet
from gistnet.train import (
    Example,
    GistTrainer,
    ObjectiveConfig,
    Substitution,
    TextBlocks,
    main,
    token_kl,
    token_nll,
)
from megacontext.lm import pydoc_topics, tiny_llama
from megacontext.tree import ConfigError, mean_gister
from tests.gistnet.test_gistnet import B, small_config, tiny_args


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny LM's matrices are too small to share out: on a busy machine, threads only contend.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def term_value(trainer: GistTrainer, batch: list[Example], term: str) -> float:
    sub, o = trainer.sub, trainer.args.objective
    with torch.no_grad():
        if term == "kl":
            logits, targets = sub.logits(batch)
            return token_kl(sub.teacher_logits(batch)[0], logits, targets).mean().item()
        if term == "contrast":
            gap = sub.nll(batch, [ex.negative_start for ex in batch]) - sub.nll(batch)
            return torch.relu(o.contrast_margin - gap).mean().item()
        return sub.recon_nll(batch).mean().item()


# what 20 steps must take off each term (fractions of its start; the tiny LM barely reads its
# context, so the KL starts near 0, and random tokens leave reconstruction little to gain)
REDUCTION = {"kl": 0.5, "contrast": 0.1, "recon": 0.02}
OBJECTIVES = {
    "kl": ObjectiveConfig(nll_weight=0.0, kl_weight=1.0),
    "contrast": ObjectiveConfig(nll_weight=0.0, contrast_weight=1.0, contrast_margin=2.0),
    "recon": ObjectiveConfig(nll_weight=0.0, recon_weight=1.0),
}


@pytest.mark.parametrize("term", sorted(OBJECTIVES))
def test_a_few_steps_reduce_each_new_loss_term_on_a_fixed_batch(tmp_path, lm, term):
    trainer = GistTrainer(tiny_args(tmp_path, OBJECTIVES[term]), lm, None)
    fixed = trainer.batch(0)
    trainer.batch = lambda step: fixed  # the same batch every step
    before = term_value(trainer, fixed, term)
    trainer.train(until=20)
    after = term_value(trainer, fixed, term)
    assert after < (1 - REDUCTION[term]) * before, (term, before, after)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(f"loss/{term}" in r and "loss/total" in r for r in logged)


def test_the_lm_weights_are_byte_identical_after_training(tmp_path, lm):
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    objective = ObjectiveConfig(kl_weight=1.0, contrast_weight=1.0, recon_weight=0.5)
    trainer = GistTrainer(tiny_args(tmp_path, objective, p_no_tail=0.5), lm, None)
    gist_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(until=5)
    after = lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while GistNet did learn (the check above is not vacuous)
    assert any(not torch.equal(gist_before[k], v) for k, v in trainer.model.state_dict().items())


def reference_nll(sub: Substitution, ex: Example, swap: int | None = None) -> float:
    """One example at a time, one GistNet call per gist, no padding: the definition."""
    b = sub.blocks.b
    src = ex.start_block if swap is None else swap
    parts = []
    with torch.no_grad():
        if ex.l2:
            kids = torch.cat(
                [
                    sub.gistnet(
                        LMPrefix(sub.lm, 2)(sub.blocks.embeddings(src - b + k, 1)),
                        sub.blocks.embeddings(src - b + k, 1),
                        1,
                    )
                    for k in range(b)
                ]
            )
            parts.append(sub.gistnet(kids[None], kids[None], 2))
        for j, kind in enumerate(ex.layout):
            if kind == "L0":
                parts.append(sub.blocks.embeddings(ex.start_block + j, 1)[0])
            else:
                emb = sub.blocks.embeddings(src + j, 1)
                parts.append(sub.gistnet(LMPrefix(sub.lm, 2)(emb), emb, 1))
        ctx = torch.cat(parts)
        query = sub.blocks.tokens(ex.start_block + len(ex.layout), ex.horizon)
        x = torch.cat([ctx, sub.blocks.embed(query)])[None]
        hidden = sub.decoder(
            inputs_embeds=x, position_ids=torch.arange(x.shape[1])[None]
        ).last_hidden_state
        logits = sub.head(hidden[0, len(ctx) - 1 : len(ctx) - 1 + len(query)])
        return float(torch.nn.functional.cross_entropy(logits, query))


def test_batched_substitution_equals_the_one_example_reference(lm):
    torch.manual_seed(3)
    rng = np.random.default_rng(0)
    blocks = TextBlocks({"a": rng.integers(0, 512, 600), "b": rng.integers(0, 512, 400)}, lm, B, 2)
    assert blocks.segments == {"a": (0, 150), "b": (150, 250)}
    net = GistNet.for_lm(small_config(), lm.get_input_embeddings().weight[:200])
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.1)
    sub = Substitution(lm, blocks, gistnet=net.eval())
    exs = [
        Example(10, ["L1", "L0", "L1"], 8),
        Example(40, ["L0", "L1", "L1", "L0"], 8, l2=True),
        Example(160, ["L0"], 5),
        Example(200, ["L1", "L1"], 8, l2=True),
    ]
    swaps = [60, 90, 170, 120]
    with torch.no_grad():
        got, got_swapped = sub.nll(exs), sub.nll(exs, swaps)
    want = [reference_nll(sub, ex) for ex in exs]
    want_swapped = [reference_nll(sub, ex, s) for ex, s in zip(exs, swaps, strict=True)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_swapped.numpy(), want_swapped, rtol=1e-4, atol=1e-4)
    # the teacher is the all-L0 context; KL of a distribution to itself is 0 and the KL matches
    # torch's
    full = [Example(ex.start_block, ["L0"] * len(ex.layout), ex.horizon) for ex in exs]
    with torch.no_grad():
        teacher, targets = sub.teacher_logits(exs)
        student, _ = sub.logits(exs)
        torch.testing.assert_close(teacher, sub.logits(full)[0])
        assert token_kl(teacher, teacher, targets).abs().max() < 1e-5
        valid = targets[2] != -100
        ref = torch.nn.functional.kl_div(
            student[2][valid].log_softmax(-1),
            teacher[2][valid].log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        torch.testing.assert_close(
            token_kl(teacher, student, targets)[2], ref, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(token_nll(student, targets), got, rtol=1e-5, atol=1e-5)


def test_batches_draw_negatives_apart_and_honour_the_layout_options(tmp_path, lm):
    trainer = GistTrainer(tiny_args(tmp_path, p_no_tail=1.0, code_share=1.0), lm, None)
    lo, hi = trainer.train_text.segments["stdlib"]
    for step in range(5):
        for ex in trainer.batch(step):
            assert (
                lo + B <= ex.negative_start and ex.negative_start + 4 + 2 <= hi
            )  # same corpus, room for L2
            assert lo <= ex.start_block - (B if ex.l2 else 0) and ex.start_block + 4 + 2 <= hi
            assert abs(ex.negative_start - ex.start_block) >= trainer.min_gap
            assert ex.layout == ["L1"] * 4  # p_no_tail = 1: every block a gist
    with pytest.raises(ConfigError):
        ObjectiveConfig(nll_weight=0.0)
    with pytest.raises(ConfigError):
        replace(tiny_args(tmp_path), code_share=1.5)


def test_validation_reports_each_corpus_and_the_far_window_gap(tmp_path, lm):
    val = GistTrainer(tiny_args(tmp_path), lm, None).validate()
    for corpus in ("pydoc", "stdlib"):
        for k in ("nll_gist", "nll_far_window", "far_minus_own", "nll_full", "nll_dropped"):
            assert np.isfinite(val[f"val/{corpus}/{k}"]), (corpus, k)
    assert val["val/far_minus_own"] == pytest.approx(
        val["val/nll_far_window"] - val["val/nll_gist"]
    )


def test_corpus_splits_are_disjoint_and_deterministic():
    topics = [set(pydoc_split(s)) for s in SPLITS]
    assert set().union(*topics) == set(pydoc_topics("all"))
    assert sum(map(len, topics)) == len(pydoc_topics("all"))  # disjoint
    assert (
        topics[2] == set(pydoc_topics("heldout")) and topics[1]
    )  # the benchmark's held-out, a validation set
    mods = [stdlib_split(s) for s in SPLITS]
    assert sum(map(len, mods)) == len(stdlib_modules()) and all(mods)
    tops = [{m.split(".")[0] for m in ms} for ms in mods]
    assert not (
        tops[0] & tops[1] or tops[0] & tops[2] or tops[1] & tops[2]
    )  # no package on two sides
    assert not any(
        m.startswith(("test.", "pydoc_data", "encodings")) or m == "test" for m in stdlib_modules()
    )
    assert stdlib_split_of("asyncio.tasks") == stdlib_split_of("asyncio")


# ------------------------------------------------------------------ no silent fallback
def test_auto_with_a_non_fitting_lm_warns_and_names_mean(lm):
    with pytest.warns(GistNetFallbackWarning, match="mean pooling"):
        gister, name = resolve_gister("auto", lm, B)
    assert gister is mean_gister
    assert (
        name.startswith("mean (no GistNet checkpoint fits")
        and f"b={B}" in name
        and "d_model=576" in name
    )
    with (
        warnings.catch_warnings()
    ):  # callers pass the recorded name on (sim.run -> labels): no new warning
        warnings.simplefilter("error")
        assert resolve_gister(name, lm, B) == (mean_gister, name)
        assert resolve_gister("mean", lm, B) == (mean_gister, "mean")


def test_auto_uses_a_fitting_checkpoint_and_refuses_a_corrupt_one(tmp_path, lm):
    net = GistNet.for_lm(small_config(), lm.get_input_embeddings().weight[:200])
    good = save_gistnet(net, tmp_path / "good.safetensors", {"lm_fingerprint": lm_fingerprint(lm)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gister, name = resolve_gister("auto", lm, B, path=good)
    assert name == "gistnet" and isinstance(gister, GistNetGister)
    # same width and b, another LM (its card says so): means, with a warning naming why
    other = save_gistnet(
        net,
        tmp_path / "other.safetensors",
        {"lm_fingerprint": {**lm_fingerprint(lm), "vocab_size": 7}},
    )
    with pytest.warns(GistNetFallbackWarning):
        assert "trained on an LM" in resolve_gister("auto", lm, B, path=other)[1]
    with pytest.warns(GistNetFallbackWarning, match="no checkpoint file"):
        resolve_gister("auto", lm, B, path=tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:100])
    for kind in ("auto", "gistnet"):
        with pytest.raises(GistNetCheckpointError, match="corrupt.safetensors"):
            resolve_gister(kind, lm, B, path=corrupt)
    (tmp_path / "good.json").write_text("{not json")
    with pytest.raises(GistNetCheckpointError, match="good.json"):
        resolve_gister("auto", lm, B, path=good)


def test_cli_trains_with_every_term_and_exports_a_checkpoint_auto_picks_up(tmp_path, lm):
    out, export = tmp_path / "run", tmp_path / "g.safetensors"
    main(
        [
            "--lm",
            "tiny",
            "--out",
            str(out),
            "--export",
            str(export),
            "--no-progress",
            "--ctx-blocks",
            "4",
            "--horizons",
            "8",
            "--val-windows",
            "4",
            "--no-tail-steps",
            "2",
            "--p-no-tail",
            "0.3",
            "--objective.kl-weight",
            "1",
            "--objective.contrast-weight",
            "1",
            "--objective.recon-weight",
            "0.5",
            "--model.d",
            "32",
            "--model.n-layers",
            "1",
            "--model.n-heads",
            "2",
            "--model.block-size",
            str(B),
            "--model.lm-layer",
            "2",
            "--train.total-steps",
            "6",
            "--train.eval-every",
            "3",
            "--train.batch-size",
            "2",
            "--train.warmup-steps",
            "1",
            "--train.device",
            "cpu",
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for k in ("loss/nll", "loss/kl", "loss/contrast", "loss/recon", "loss/total"):
        assert all(np.isfinite(r[k]) for r in records), k
    card = json.loads(export.with_suffix(".json").read_text())
    assert card["selected"]["select"] == "best" and card["selected"]["step"] in (3, 6)
    assert card["lm_fingerprint"] == lm_fingerprint(lm) and card["corpus"]["python"]
    assert "val/far_minus_own" in card["selected"]["validation"]
    assert resolve_gister("auto", lm, B, path=export)[1] == "gistnet"
    # --init starts a new run from the exported weights (and their running-text statistics)
    again = GistTrainer(tiny_args(tmp_path / "again", init=str(export)), lm, None)
    exported = load_gistnet(export)
    assert all(
        torch.equal(v, exported.state_dict()[k]) for k, v in again.model.state_dict().items()
    )
