"""LensNet model: shapes, padding, no NaN on empty inputs, non-causal, hard legality mask."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lensnet.data import collate
from lensnet.model import LensNet, LensNetConfig
from megacontext.tree import ConfigError
from tests.lensnet.strategies import context_items
from tests.strategies import random_snapshot


def _batch(ns=(5, 9, 3), d=8, seed=0):
    rng = np.random.default_rng(seed)
    return collate([random_snapshot(rng, n=n, d_model=d) for n in ns])


def _model(d=8, **kw):
    torch.manual_seed(0)
    m = LensNet(LensNetConfig.tiny(d, block_size=4, **kw))
    for p in m.head.parameters():  # the head starts at 0; give it weights so outputs vary
        torch.nn.init.normal_(p)
    return m.eval()


def test_shapes_and_padding_is_zero():
    b = _batch()
    out = _model()(b)
    assert out.shape == (3, 9) and torch.isfinite(out).all()
    assert torch.all(out[~b["valid_mask"]] == 0)


def test_padding_does_not_change_scores():
    rng = np.random.default_rng(1)
    snaps = [random_snapshot(rng, n=n, d_model=8) for n in (4, 10)]
    m = _model()
    alone = m(collate([snaps[0]]))[0, :4]
    padded = m(collate(snaps))[0, :4]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_non_causal_later_entries_change_earlier_scores():
    b = _batch(ns=(6,))
    m = _model()
    before = m(b)[0, 0].item()
    b["embeddings"][0, 5] += 3.0
    assert m(b)[0, 0].item() != pytest.approx(before, abs=1e-6)


def test_no_tail_and_all_padding_snapshots_stay_finite():
    b = _batch(ns=(4, 4))
    b["tail_mask"][:] = False
    b["valid_mask"][1] = False
    out = _model()(b)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)


def test_score_hard_masks_illegal_directions():
    b = _batch(ns=(12, 7))
    s = _model()(b)
    masked = _model().score(b)
    can_e, can_c = b["expand_cost"] > 0, b["collapse_refund"] > 0
    assert not torch.any((masked > 0) & ~can_e) and not torch.any((masked < 0) & ~can_c)
    legal = ((s > 0) & can_e) | ((s < 0) & can_c)
    torch.testing.assert_close(masked[legal], s[legal])


def test_bad_inputs_and_config():
    with pytest.raises(ConfigError, match="divide"):
        LensNetConfig(d_lens=30, n_heads=4)
    with pytest.raises(ConfigError, match="dropout"):
        LensNetConfig(dropout=1.5)
    b = _batch()
    with pytest.raises(ValueError, match="d_model=16"):
        _model(d=16)(b)


def test_seed_config_parameter_count():
    m = LensNet(LensNetConfig(d_model=576))
    assert 1_000_000 < m.n_params() < 20_000_000


def test_group_mean_matches_a_loop():
    from lensnet.model import group_mean

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g)
    gid = torch.tensor(
        [[0, 0, 2, 2, -1, 5, 5], [-1, -1, -1, -1, -1, -1, -1], [1, 1, 1, 3, 3, 3, -1]]
    )
    got = group_mean(x, gid)
    for b in range(3):
        for i in range(7):
            if gid[b, i] < 0:
                assert torch.all(got[b, i] == 0)
            else:
                members = gid[b] == gid[b, i]
                torch.testing.assert_close(got[b, i], x[b, members].mean(0))


def test_group_members_share_information():
    """A change in one member's embedding reaches its siblings' scores, not other groups'."""
    b = _batch(ns=(8,))
    b["group_id"][0] = torch.tensor([0, 0, 0, 0, 4, 4, 4, 4])
    b["tail_mask"][:] = False  # no route through the tail gists
    m = _model()
    before = m(b)[0].clone()
    b["embeddings"][0, 0] += 2.0
    after = m(b)[0]
    assert not torch.allclose(before[1:4], after[1:4])


def test_lensnet_learns_a_tail_match():
    """The task LensNet exists for: score an entry by whether the newest tail gist cues it
    (a bilinear key-cue match). The direct match features make it learnable in a few hundred steps.
    """
    torch.manual_seed(0)
    b, n, t, k = 16, 24, 3, 16
    model = LensNet(
        LensNetConfig(d_model=2 * k, d_lens=32, n_heads=2, n_stacks=1, dropout=0.0, block_size=4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(gen):
        keys = torch.linalg.qr(torch.randn(b, k, k, generator=gen))[0].transpose(
            1, 2
        )  # orthonormal rows
        idx = torch.randint(0, k, (b, n), generator=gen)
        emb = torch.zeros(b, n, 2 * k)
        emb[..., :k] = torch.gather(keys, 1, idx[..., None].expand(-1, -1, k))
        tail = 0.1 * torch.randn(b, t, 2 * k, generator=gen)
        tail[:, -1, k:] = torch.gather(
            keys, 1, torch.randint(0, k, (b, 2), generator=gen)[..., None].expand(-1, -1, k)
        ).sum(1)
        y = (emb[..., :k] * tail[:, -1:, k:]).sum(-1)
        ones = torch.ones(b, n, dtype=torch.bool)
        return {
            "embeddings": emb,
            "levels": torch.ones(b, n, dtype=torch.long),
            "span_width": torch.full((b, n), 4.0),
            "distance_to_cursor": torch.ones(b, n),
            "valid_mask": ones,
            "tail_gists": tail,
            "tail_levels": torch.ones(b, t, dtype=torch.long),
            "tail_mask": torch.ones(b, t, dtype=torch.bool),
        }, y

    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        x, y = batch(gen)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = model(x)
    assert np.corrcoef(pred.flatten(), y.flatten())[0, 1] > 0.9


def _assert_fast_matches_reference(model, batch):
    """In float64, so that a real difference is not lost in float32 summation-order noise."""
    model = model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    fast, ref = model(batch), model.reference_forward(batch)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)
    weights = torch.linspace(-1, 1, fast.numel(), dtype=torch.float64).view_as(fast)
    params = list(model.parameters())
    g_fast = torch.autograd.grad((fast * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


@given(
    st.lists(context_items(n_tail_gists=3, max_entries=200), min_size=1, max_size=3),
    st.sampled_from([1, 2, 4]),
    st.booleans(),
    st.sampled_from(["factored", "full"]),
)
def test_fast_forward_matches_the_reference(items, n_heads, match_skip, match_form):
    """``forward`` (folded attention, packed entries) = ``reference_forward`` (nn.MultiheadAttention
    over padded entries), values and every parameter's gradient, on real working contexts."""
    batch = collate(items)
    torch.manual_seed(0)
    model = LensNet(
        LensNetConfig(
            d_model=4,
            d_lens=16,
            n_heads=n_heads,
            n_stacks=2,
            dropout=0.0,
            max_level=3,
            block_size=4,
            match_skip=match_skip,
            match_form=match_form,
        )
    )
    torch.nn.init.normal_(model.head.weight)
    if match_skip:  # it starts at 0; give it weights so the path is compared too
        torch.nn.init.normal_(model.match_skip)
    _assert_fast_matches_reference(model, batch)


def test_fast_forward_matches_the_reference_without_tail_or_entries():
    b = _batch(ns=(6, 4, 9))
    b["group_id"][0, :6] = torch.tensor([0, 0, 0, 0, -1, -1])
    b["tail_mask"][0] = False  # no tail gist: only the null latent
    b["valid_mask"][1] = False  # an all-padding snapshot
    model = _model().train()
    torch.nn.init.normal_(model.match_skip)
    _assert_fast_matches_reference(model, b)


@given(st.lists(context_items(n_tail_gists=3, max_entries=120), min_size=1, max_size=3))
def test_fast_forward_matches_the_reference_with_entry_features(items):
    """The extra per-entry features (``n_entry_features``) enter both paths alike, and a LensNet
    that reads them refuses a batch without them."""
    rng = np.random.default_rng(len(items))
    for it in items:
        it["entry_features"] = rng.normal(size=(it["levels"].shape[0], 5)).astype(np.float32)
    batch = collate(items)
    torch.manual_seed(0)
    model = LensNet(
        LensNetConfig(
            d_model=4, d_lens=16, n_heads=2, dropout=0.0, max_level=3, block_size=4,
            match_skip=True, n_entry_features=5,
        )
    )
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.entry_skip)
    _assert_fast_matches_reference(model, batch)
    with pytest.raises(ValueError, match="entry_features must be"):
        model({k: v for k, v in batch.items() if k != "entry_features"})


def test_group_ids_outside_the_snapshot_are_refused():
    b = _batch(ns=(5, 9))
    b["group_id"][0, :2] = 9  # N = 9: id 9 would be the next snapshot's key
    with pytest.raises(ValueError, match="group_id must be -1"):
        _model()(b)


def test_calibrated_score_scales_the_raw_scores_and_survives_a_checkpoint(tmp_path):
    from lensnet.train import CheckpointError, load_model, save_calibration

    b = _batch()
    model = _model()
    raw = model.score(b)
    torch.save(
        {"model": model.state_dict(), "model_config": vars(model.config) | {}, "step": 1},
        tmp_path / "c.pt",
    )
    assert load_model(tmp_path / "c.pt").score_scale == 1.0  # no calibration stored: unchanged
    save_calibration(tmp_path / "c.pt", {"score_scale": 2.5})
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.score_scale == 2.5
    torch.testing.assert_close(loaded.score(b), 2.5 * raw)
    with pytest.raises(ValueError, match="score_scale"):
        save_calibration(tmp_path / "c.pt", {"score_scale": -1.0})
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    ckpt["calibration"] = {"score_scale": float("nan")}
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="score_scale"):
        load_model(tmp_path / "c.pt")
    # the gate: 'scale' unless the calibration chose 'rank'; anything else named
    assert loaded.score_gate == "scale"
    save_calibration(tmp_path / "c.pt", {"score_scale": 2.0, "gate": "rank"})
    assert load_model(tmp_path / "c.pt").score_gate == "rank"
    with pytest.raises(ValueError, match="gate"):
        save_calibration(tmp_path / "c.pt", {"score_scale": 2.0, "gate": "sigmoid"})
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    ckpt["calibration"] = {"score_scale": 1.0, "gate": "ranked"}
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="gate"):
        load_model(tmp_path / "c.pt")
