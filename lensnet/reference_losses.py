"""Straightforward loop implementation of the DESIGN §5 losses: the reference for tests and
benchmarks.

Plain Python over snapshots, entries and pairs, on floats, with the gradient with respect to the
predictions written out by hand. Slow by design: it exists to be obviously right.
"""

from __future__ import annotations

import math

Grid = list[list[float]]


def _zeros(b: int, n: int) -> Grid:
    return [[0.0] * n for _ in range(b)]


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def regression(pred: Grid, target: Grid, mask: list[list[bool]]) -> tuple[float, Grid]:
    b, n = len(pred), len(pred[0])
    cells = [(s, i) for s in range(b) for i in range(n) if mask[s][i]]
    grad = _zeros(b, n)
    if not cells:
        return 0.0, grad
    total = 0.0
    for s, i in cells:
        d = pred[s][i] - target[s][i]
        total += d * d
        grad[s][i] = 2 * d / len(cells)
    return total / len(cells), grad


def regression_by_level(
    pred: Grid, target: Grid, mask: list[list[bool]], levels: list[list[int]]
) -> tuple[float, Grid]:
    """L_reg per tree level, averaged over the levels that have labelled entries."""
    b, n = len(pred), len(pred[0])
    by_level: dict[int, list[tuple[int, int]]] = {}
    for s in range(b):
        for i in range(n):
            if mask[s][i]:
                by_level.setdefault(levels[s][i], []).append((s, i))
    grad = _zeros(b, n)
    if not by_level:
        return 0.0, grad
    total = 0.0
    for cells in by_level.values():
        part = 0.0
        for s, i in cells:
            d = pred[s][i] - target[s][i]
            part += d * d
            grad[s][i] = 2 * d / (len(cells) * len(by_level))
        total += part / len(cells)
    return total / len(by_level), grad


def ranking(
    pred: Grid, target: Grid, mask: list[list[bool]], margin: float = 0.1
) -> tuple[float, Grid]:
    b, n = len(pred), len(pred[0])
    grad = _zeros(b, n)
    total, count = 0.0, 0
    pairs = []
    for s in range(b):
        for i in range(n):
            if not mask[s][i]:
                continue
            for j in range(n):
                if mask[s][j] and target[s][i] > target[s][j] + margin:
                    d = pred[s][i] - pred[s][j]
                    total += _softplus(-d)
                    count += 1
                    pairs.append((s, i, j, d))
    if count == 0:
        return 0.0, grad
    for s, i, j, d in pairs:  # d softplus(-d) / d d = -sigmoid(-d)
        g = -_sigmoid(-d) / count
        grad[s][i] += g
        grad[s][j] -= g
    return total / count, grad


def budget(
    pred: Grid, expand_cost: Grid, collapse_refund: Grid, eps: float = 1e-6
) -> tuple[float, Grid]:
    b, n = len(pred), len(pred[0])
    grad = _zeros(b, n)
    total = 0.0
    for s in range(b):
        p = sum(expand_cost[s][i] * max(pred[s][i], 0.0) for i in range(n))
        q = sum(collapse_refund[s][i] * max(-pred[s][i], 0.0) for i in range(n))
        den = eps + p + q
        r = (p - q) / den
        total += r * r
        # d r / d p = (den - (p - q)) / den^2, d r / d q = (-den - (p - q)) / den^2
        dp = 2 * r * (den - (p - q)) / den**2 / b
        dq = 2 * r * (-den - (p - q)) / den**2 / b
        for i in range(n):
            if pred[s][i] > 0:
                grad[s][i] += dp * expand_cost[s][i]
            elif pred[s][i] < 0:
                grad[s][i] -= dq * collapse_refund[s][i]
    return total / b, grad


def illegality(
    pred: Grid,
    levels: list[list[int]],
    valid: list[list[bool]],
    max_level: int,
    alpha: float = 0.3,
    beta: float = 0.3,
) -> tuple[float, Grid]:
    b, n = len(pred), len(pred[0])
    grad = _zeros(b, n)
    count = sum(valid[s][i] for s in range(b) for i in range(n))
    if count == 0:
        return 0.0, grad
    total = 0.0
    for s in range(b):
        for i in range(n):
            if not valid[s][i]:
                continue
            u = pred[s][i]
            if levels[s][i] == 0 and u > 0:
                total += alpha * u / count
                grad[s][i] += alpha / count
            if levels[s][i] == max_level and u < 0:
                total += beta * -u / count
                grad[s][i] -= beta / count
    return total, grad


def lensnet_loss(
    pred: Grid,
    batch: dict[str, Grid],
    lambda_rank: float = 0.5,
    lambda_budget: float = 0.1,
    max_level: int = 2,
) -> tuple[dict[str, float], Grid]:
    """All four terms and L, plus dL/dpred, as ``LensNetLoss`` defines them."""
    b, n = len(pred), len(pred[0])
    valid = [[bool(v) for v in row] for row in batch["valid_mask"]]
    mask = [
        [bool(m) and valid[s][i] for i, m in enumerate(row)]
        for s, row in enumerate(batch["action_mask"])
    ]
    ec = [
        [c if valid[s][i] else 0.0 for i, c in enumerate(row)]
        for s, row in enumerate(batch["expand_cost"])
    ]
    cr = [
        [c if valid[s][i] else 0.0 for i, c in enumerate(row)]
        for s, row in enumerate(batch["collapse_refund"])
    ]
    r, gr = regression(pred, batch["target_utilities"], mask)
    k, gk = ranking(pred, batch["target_utilities"], mask)
    u, gu = budget(pred, ec, cr)
    ill, gi = illegality(pred, batch["levels"], valid, max_level)
    total = r + lambda_rank * k + lambda_budget * u + ill
    grad = [
        [gr[s][i] + lambda_rank * gk[s][i] + lambda_budget * gu[s][i] + gi[s][i] for i in range(n)]
        for s in range(b)
    ]
    return {"loss": total, "L_reg": r, "L_rank": k, "L_budget": u, "L_illegal": ill}, grad
