"""Metrics against direct computations on small cases; accumulation across batches is exact."""

import numpy as np
import pytest
import torch
from hypothesis import given

from lensnet.metrics import MetricAccumulator, compute_metrics
from tests.lensnet.strategies import loss_batches


def _batch(y, u, mask=None, valid=None, ec=None, cr=None):
    y, u = torch.tensor([y], dtype=torch.float64), torch.tensor([u], dtype=torch.float64)
    ones = torch.ones_like(y, dtype=torch.bool)
    return u, {
        "target_utilities": y,
        "action_mask": ones if mask is None else torch.tensor([mask]),
        "valid_mask": ones if valid is None else torch.tensor([valid]),
        "expand_cost": torch.tensor([ec or [1.0] * y.shape[1]]),
        "collapse_refund": torch.tensor([cr or [1.0] * y.shape[1]]),
        "levels": torch.zeros_like(y, dtype=torch.long),
        "span_width": torch.ones_like(y),
    }


def test_perfect_and_reversed_ranking():
    u, b = _batch([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    m = compute_metrics(u, b)
    assert m["ranking_accuracy"] == 1.0 and m["pearson"] == pytest.approx(1.0) and m["mse"] == 0.0
    u, b = _batch([0.0, 1.0, 2.0], [2.0, 1.0, 0.0])
    assert compute_metrics(u, b)["ranking_accuracy"] == 0.0


def test_empty_gives_none_not_nan():
    u, b = _batch([0.0, 0.0], [1.0, 2.0], mask=[False, False], valid=[False, False])
    m = compute_metrics(u, b)
    assert m["ranking_accuracy"] is None and m["pearson"] is None and m["mse"] is None
    assert m["legality_compliance"] is None


def test_budget_balance_and_legality():
    u, b = _batch([0, 0, 0], [1.0, -1.0, -1.0], ec=[2.0, 0.0, 0.0], cr=[0.0, 1.0, 0.0])
    m = compute_metrics(u, b)
    # P = 2, N = 1 -> |P-N|/(P+N) = 1/3; entry 2 points to an illegal collapse
    assert m["budget_balance"] == pytest.approx(1 / 3)
    assert m["legality_compliance_raw"] == pytest.approx(2 / 3) and m["legality_compliance"] == 1.0


@given(loss_batches(max_b=4, max_n=8))
def test_accumulation_equals_one_big_batch(args):
    pred, batch = args
    whole = compute_metrics(pred, batch)
    acc = MetricAccumulator()
    for s in range(pred.shape[0]):
        acc.update(pred[s : s + 1], {k: v[s : s + 1] for k, v in batch.items()})
    parts = acc.compute()
    for k, v in whole.items():
        assert (v is None) == (parts[k] is None), k
        if v is not None:
            assert parts[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
            assert np.isfinite(v)


@given(loss_batches(max_b=4, max_n=10))
def test_precision_at_n_diff_against_brute_force(args):
    pred, batch = args
    n_diff, tau = 2, 0.1
    got = MetricAccumulator(n_diff=n_diff, tau_expand=tau)
    got.update(pred, batch)
    hits = total = 0
    for s in range(pred.shape[0]):
        ok = [
            i
            for i in range(pred.shape[1])
            if batch["valid_mask"][s, i]
            and batch["action_mask"][s, i]
            and batch["expand_cost"][s, i] > 0
        ]
        y = {i: float(batch["target_utilities"][s, i]) for i in ok}
        k = min(n_diff, sum(v > tau for v in y.values()))
        by_y = sorted(ok, key=lambda i: (-y[i], i))[:k]
        by_u = sorted(ok, key=lambda i: (-float(pred[s, i]), i))[:k]
        hits += len(set(by_y) & set(by_u))
        total += k
    value = got.compute()["precision_at_n_diff"]
    assert value is None if total == 0 else value == pytest.approx(hits / total)


def test_precision_at_n_diff_counts_the_right_expands():
    # expandable entries 0..3 with labels 0.5, 0.3, 0.0, 0.25; k = min(2, three above 0.2) = 2
    u, b = _batch(
        [0.5, 0.3, 0.0, 0.25, -1.0], [0.1, 0.0, 0.9, 0.05, 5.0], ec=[1.0, 1.0, 1.0, 1.0, 0.0]
    )
    acc = MetricAccumulator(n_diff=2, tau_expand=0.2)
    acc.update(u, b)
    assert acc.compute()["precision_at_n_diff"] == pytest.approx(0.5)  # picks {2, 0}; right: {0, 1}
