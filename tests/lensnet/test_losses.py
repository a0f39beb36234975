"""Vectorised losses against the loop reference: values and gradients to 1e-5; empty masks give 0.
"""

import math

import pytest
import torch
from hypothesis import given

from lensnet import reference_losses as ref
from lensnet.losses import (
    BATCH_KEYS,
    LensNetLoss,
    budget_loss,
    illegality_loss,
    level_balanced_regression_loss,
    ranking_loss,
    regression_loss,
)
from megacontext.tree import ConfigError
from tests.lensnet.strategies import loss_batches


def _lists(batch):
    return {k: v.tolist() for k, v in batch.items()}


@given(loss_batches())
def test_lensnet_loss_matches_loop_reference(args):
    pred, batch = args
    pred = pred.clone().requires_grad_(True)
    out = LensNetLoss(max_level=2)(pred, batch)
    out["loss"].backward()
    want, want_grad = ref.lensnet_loss(pred.detach().tolist(), _lists(batch), max_level=2)
    for k in ("L_reg", "L_rank", "L_budget", "L_illegal"):
        assert math.isfinite(out[k])
        assert out[k] == pytest.approx(want[k], abs=1e-5, rel=1e-5), k
    assert out["loss"].item() == pytest.approx(want["loss"], abs=1e-5, rel=1e-5)
    torch.testing.assert_close(
        pred.grad, torch.tensor(want_grad, dtype=pred.dtype), atol=1e-5, rtol=1e-5
    )


@given(loss_batches(max_b=3, max_n=8))
def test_each_term_matches_reference(args):
    pred, batch = args
    mask = batch["action_mask"] & batch["valid_mask"]
    y = batch["target_utilities"]
    cases = [
        (regression_loss, (y, mask), ref.regression, (y.tolist(), mask.tolist())),
        (ranking_loss, (y, mask), ref.ranking, (y.tolist(), mask.tolist())),
        (
            lambda p, t, m, lv: level_balanced_regression_loss(p, t, m, lv, 3),
            (y, mask, batch["levels"]),
            ref.regression_by_level,
            (y.tolist(), mask.tolist(), batch["levels"].tolist()),
        ),
        (
            budget_loss,
            (batch["expand_cost"], batch["collapse_refund"]),
            ref.budget,
            (batch["expand_cost"].tolist(), batch["collapse_refund"].tolist()),
        ),
        (
            lambda p, lv, v: illegality_loss(p, lv, v, max_level=2),
            (batch["levels"], batch["valid_mask"]),
            lambda p, lv, v: ref.illegality(p, lv, v, 2),
            (batch["levels"].tolist(), batch["valid_mask"].tolist()),
        ),
    ]
    for fast, fast_args, slow, slow_args in cases:
        p = pred.clone().requires_grad_(True)
        value = fast(p, *fast_args)
        value.backward()
        want, want_grad = slow(pred.tolist(), *slow_args)
        assert value.item() == pytest.approx(want, abs=1e-5, rel=1e-5)
        torch.testing.assert_close(
            p.grad, torch.tensor(want_grad, dtype=p.dtype), atol=1e-5, rtol=1e-5
        )


@given(loss_batches(max_b=3, max_n=8))
def test_level_balanced_loss_uses_the_balanced_regression(args):
    pred, batch = args
    plain, balanced = (
        LensNetLoss(max_level=2)(pred, batch),
        LensNetLoss(max_level=2, reg_balance="levels")(pred, batch),
    )
    mask = (batch["action_mask"] & batch["valid_mask"]).tolist()
    want, _ = ref.regression_by_level(
        pred.tolist(), batch["target_utilities"].tolist(), mask, batch["levels"].tolist()
    )
    assert balanced["L_reg"] == pytest.approx(want, abs=1e-5, rel=1e-5)
    for k in ("L_rank", "L_budget", "L_illegal"):  # the other terms are untouched
        assert balanced[k] == plain[k]
    assert balanced["loss"].item() == pytest.approx(
        plain["loss"].item() - plain["L_reg"] + want, abs=1e-5, rel=1e-5
    )


def test_level_balance_weights_each_level_alike():
    # one L1 entry off by 1, three L0 entries exact: plain mean 1/4, balanced (0 + 1) / 2
    pred = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    y, m = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    levels = torch.tensor([[0, 0, 0, 1]])
    assert regression_loss(pred, y, m).item() == pytest.approx(0.25)
    assert level_balanced_regression_loss(pred, y, m, levels, 3).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reg_balance"):
        LensNetLoss(reg_balance="tokens")


def test_empty_masks_give_zero_not_nan():
    pred = torch.randn(2, 5, requires_grad=True)
    nan = torch.full((2, 5), float("nan"))
    none = torch.zeros(2, 5, dtype=torch.bool)
    zeros = torch.zeros(2, 5)
    batch = {
        "target_utilities": nan,
        "action_mask": none,
        "valid_mask": none,
        "levels": torch.zeros(2, 5, dtype=torch.long),
        "span_width": zeros,
        "expand_cost": zeros,
        "collapse_refund": zeros,
    }
    out = LensNetLoss()(pred, batch)
    assert out["L_reg"] == out["L_rank"] == out["L_budget"] == out["L_illegal"] == 0.0
    out["loss"].backward()
    assert torch.all(pred.grad == 0)


def test_pairs_never_cross_snapshots():
    # Snapshot 0 has one high label, snapshot 1 one low label: no within-snapshot pair exists.
    pred = torch.tensor([[0.0], [5.0]], requires_grad=True)
    y = torch.tensor([[1.0], [-1.0]])
    m = torch.ones(2, 1, dtype=torch.bool)
    assert ranking_loss(pred, y, m).item() == 0.0
    y2 = torch.tensor([[1.0, -1.0]])
    loss = ranking_loss(torch.tensor([[0.0, 0.0]]), y2, torch.ones(1, 2, dtype=torch.bool))
    assert float(loss) == pytest.approx(math.log(2))


def test_shape_and_key_errors_are_clear():
    pred = torch.zeros(2, 3)
    with pytest.raises(KeyError, match="lacks keys"):
        LensNetLoss()(pred, {})
    bad = {k: torch.zeros(2, 4) for k in BATCH_KEYS}
    with pytest.raises(ValueError, match="shape"):
        LensNetLoss()(pred, bad)


@given(loss_batches())
def test_loss_config_weights_reach_the_loss(args):
    """The weights live in the training config (``LossConfig``): the loss built from a config with
    other weights equals the loop reference with those weights."""
    from lensnet.losses import LossConfig
    from lensnet.train import TrainConfig

    pred, batch = args
    cfg = LossConfig(lambda_rank=2.0, lambda_budget=0.7, reg_balance="entries")
    out = LensNetLoss.from_config(cfg, max_level=2)(pred, batch)
    want, _ = ref.lensnet_loss(pred.tolist(), _lists(batch), lambda_rank=2.0, lambda_budget=0.7,
                               max_level=2)
    assert tuple(k for k in out if k != "loss") == LensNetLoss.TERMS
    assert out["loss"].item() == pytest.approx(want["loss"], abs=1e-5, rel=1e-5)
    assert TrainConfig(loss=cfg).loss.lambda_rank == 2.0
    with pytest.raises(ConfigError, match="lambda_rank"):
        LossConfig(lambda_rank=-1.0)
