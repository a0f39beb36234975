"""GistNet: shapes and errors, the untrained output formula, the tree's gister interface, LM block
features against a reference, checkpoint round trip, and that training reduces the substitution
loss."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from gistnet.gister import (
    GistNetCheckpointError,
    GistNetFallbackWarning,
    GistNetGister,
    LMPrefix,
    gistnet_gister_for,
    load_gistnet,
    resolve_gister,
    save_gistnet,
)
from gistnet.model import GistNet, GistNetConfig, SoftPrompt
from gistnet.train import Example, GistTrainArgs, GistTrainer, ObjectiveConfig
from megacontext.lm import tiny_llama
from megacontext.training import LoopConfig
from megacontext.tree import ConfigError, MegaContextTree, TreeConfig, mean_gister

B, D = 4, 64  # tiny LM width


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


def small_config(**kw) -> GistNetConfig:
    return GistNetConfig(d_model=D, d=32, n_layers=1, n_heads=2, block_size=B, lm_layer=2, **kw)


def test_shapes_and_clear_errors():
    net = GistNet(small_config())
    x = torch.randn(5, B, D)
    assert net(x, x, 1).shape == (5, D) and net(x, x, 2).shape == (5, D)
    with pytest.raises(ValueError, match="features must be"):
        net(torch.randn(5, B + 1, D), torch.randn(5, B + 1, D), 1)
    with pytest.raises(ValueError, match="level must be"):
        net(x, x, 3)
    with pytest.raises(ConfigError):
        GistNetConfig(d=30, n_heads=4)
    assert 0.8e6 < GistNet(GistNetConfig()).n_params() < 1.5e6  # "~1M params at d_model 576"


def test_untrained_output_is_the_centred_mean_formula():
    torch.manual_seed(0)
    text = torch.randn(300, D) - 0.2
    net = GistNet.for_lm(small_config(), text)
    m, s = text.mean(0), (text - text.mean(0)).pow(2).mean().sqrt()
    x, feats = torch.randn(6, B, D), torch.randn(6, B, D)
    for level in (1, 2):
        c = x.mean(1) - m
        expect = m + s * c / c.pow(2).mean(-1, keepdim=True).sqrt()
        torch.testing.assert_close(net(feats, x, level), expect, rtol=1e-5, atol=1e-5)


def test_lm_prefix_equals_the_truncated_lm(lm):
    prefix = LMPrefix(lm, 2)
    x = torch.randn(3, B, D) * 0.1
    got = prefix(x)
    out = lm.base_model(
        inputs_embeds=x,
        position_ids=torch.arange(B)[None].expand(3, -1),
        attention_mask=torch.ones(3, B, dtype=torch.long),
        output_hidden_states=True,
    )
    ref = lm.base_model.norm(
        out.hidden_states[2]
    )  # hidden state after 2 layers, final norm applied
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert len(lm.base_model.layers) == 4 and lm.config.num_hidden_layers == 4  # restored
    with pytest.raises(ValueError):
        LMPrefix(lm, 9)


def test_tree_uses_gistnet_through_the_gister_interface(lm):
    torch.manual_seed(1)
    net = GistNet.for_lm(small_config(), lm.get_input_embeddings().weight[:200])
    with torch.no_grad():  # make delta non-zero so the encoder matters
        net.out[-1].weight.normal_(0, 0.1)
    gister = GistNetGister(net, lm)
    emb = np.random.default_rng(0).normal(size=(B * B * 2, D)).astype(np.float32)
    tree = MegaContextTree(TreeConfig(block_size=B, max_level=2, d_model=D), gister=gister)
    tree.ingest(np.arange(len(emb)), emb)
    l1 = tree.embeddings(1, np.arange(2 * B))
    children = torch.as_tensor(emb.reshape(2 * B, B, D))
    with torch.no_grad():
        expect1 = net(LMPrefix(lm, 2)(children), children, 1).numpy()
        expect2 = net(
            torch.as_tensor(expect1.reshape(2, B, D)), torch.as_tensor(expect1.reshape(2, B, D)), 2
        ).numpy()
    np.testing.assert_allclose(l1, expect1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tree.embeddings(2, np.arange(2)), expect2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(l1, mean_gister(emb.reshape(2 * B, B, D), 1))
    with pytest.raises(ValueError, match="GistNet expects"):
        gister(np.zeros((1, B + 1, D), np.float32), 1)


def test_checkpoint_round_trip_and_errors(tmp_path, lm):
    torch.manual_seed(2)
    net = GistNet.for_lm(small_config(), lm.get_input_embeddings().weight[:200])
    with torch.no_grad():
        net.out[-1].weight.normal_(0, 0.1)
    path = save_gistnet(net, tmp_path / "g.safetensors", {"seed": 2})
    back = load_gistnet(path)
    x = torch.randn(3, B, D)
    torch.testing.assert_close(back(x, x, 1), net.eval()(x, x, 1), rtol=0, atol=0)
    assert back.config == net.config and (tmp_path / "g.json").exists()
    with pytest.raises(GistNetCheckpointError, match="no GistNet checkpoint"):
        load_gistnet(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(GistNetCheckpointError, match="unreadable"):
        load_gistnet(tmp_path / "bad.safetensors")
    with pytest.raises(GistNetCheckpointError, match="d_model"):
        gistnet_gister_for(lm, 32, path)  # made for b=4


def test_resolve_gister_auto_falls_back_for_an_lm_without_a_checkpoint(lm):
    with pytest.warns(GistNetFallbackWarning):
        gister, name = resolve_gister("auto", lm, B)
    assert name.startswith("mean (no GistNet checkpoint fits") and gister is mean_gister
    with pytest.raises(GistNetCheckpointError):
        resolve_gister("gistnet", lm, B)
    with pytest.raises(ValueError):
        resolve_gister("median", lm, B)


def tiny_args(tmp_path, objective: ObjectiveConfig | None = None, **kw) -> GistTrainArgs:
    """A few seconds of GistNet training on the tiny LM (``objective``: the default's if None)."""
    return GistTrainArgs(
        out=str(tmp_path),
        lm="tiny",
        ctx_blocks=4,
        no_tail_steps=0,
        horizons=(8,),
        val_windows=4,
        progress=False,
        p_l2=0.5,
        model=small_config(),
        objective=objective or ObjectiveConfig(),
        train=LoopConfig(
            lr=3e-3,
            warmup_steps=1,
            total_steps=40,
            eval_every=40,
            ckpt_every=40,
            batch_size=4,
            weight_decay=0.0,
        ),
        **kw,
    )


@pytest.mark.parametrize("kind", ["gistnet", "softprompt"])
def test_training_steps_reduce_the_substitution_loss_on_a_fixed_batch(tmp_path, lm, kind):
    lm_before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    trainer = GistTrainer(tiny_args(tmp_path, kind=kind), lm, None)
    assert (
        trainer.sub.lm is lm
    )  # the LM compared below is the one the substitution loss runs through
    fixed = trainer.batch(0)
    assert any(ex.l2 for ex in fixed) and all(ex.layout[-1] == "L0" for ex in fixed)
    trainer.batch = lambda step: fixed  # the same batch every step
    with torch.no_grad():
        before = trainer.sub.nll(fixed).mean().item()
    trainer.train(until=25)
    with torch.no_grad():
        after = trainer.sub.nll(fixed).mean().item()
    assert after < before - 0.05, (before, after)
    # the LM stays frozen: every tensor of it bit-identical after training
    lm_after = lm.state_dict()
    assert lm_after.keys() == lm_before.keys()
    changed = [k for k, v in lm_before.items() if not torch.equal(v, lm_after[k])]
    assert not changed, f"training changed the frozen LM: {changed[:5]}"
    if kind == "gistnet":
        # L2 substitution goes through GistNet twice (children gists, then the L2 gist)
        ex = Example(start_block=B, layout=["L1", "L0"], horizon=8, l2=True)
        seq, query = trainer.sub.sequence(ex)
        assert seq.shape == (1 + 1 + B, D) and query.shape == (8,)


def test_validation_reports_content_controls(tmp_path, lm):
    trainer = GistTrainer(tiny_args(tmp_path), lm, None)
    val = trainer.validate()
    for k in ("val/nll_gist", "val/nll_far_window", "val/nll_full", "val/nll_dropped"):
        assert np.isfinite(val[k]), k
    assert val["val/loss"] == val["val/nll_gist"]


def test_soft_prompt_ignores_text():
    sp = SoftPrompt(3, torch.zeros(D), 1.0)
    assert sp(2).shape == (2, D)
    with pytest.raises(ValueError):
        sp(4)


def test_bad_training_config_is_refused(tmp_path, lm):
    with pytest.raises(ConfigError):
        GistTrainer(replace(tiny_args(tmp_path), ctx_blocks=100_000), lm, None)


@pytest.mark.real_lm
def test_default_checkpoint_loads_for_smollm2_and_is_the_default_gister():
    from megacontext.lm import load_lm, pydoc_token_ids

    lm, tok = load_lm("smollm2", device="cpu")
    gister, name = resolve_gister("auto", lm, 32)
    assert name == "gistnet" and isinstance(gister, GistNetGister)
    ids = pydoc_token_ids(tok, "heldout")[: 32 * 32]
    with torch.no_grad():
        emb = lm.get_input_embeddings()(torch.as_tensor(ids)).numpy()
    tree = MegaContextTree(TreeConfig(block_size=32, max_level=2, d_model=576), gister=gister)
    tree.ingest(ids, emb)
    l1, l2 = tree.embeddings(1, np.arange(32)), tree.embeddings(2, np.arange(1))
    assert np.all(np.isfinite(l1)) and np.all(np.isfinite(l2)) and l2.shape == (1, 576)
    # gists of different blocks differ (no collapse to one vector); their norms are not tested: the
    # trained gists are ~2.5x longer than tokens (the learned delta dominates, see the README)
    spread = np.linalg.norm(l1 - l1.mean(0), axis=1).mean()
    tok_spread = np.linalg.norm(emb - emb.mean(0), axis=1).mean()
    assert spread > 0.2 * tok_spread, (spread, tok_spread)
