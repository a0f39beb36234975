"""LensNet evaluation metrics (DESIGN.md §5), batched and accumulated exactly across batches.

Each metric is a ratio of sums, so ``MetricAccumulator`` keeps the sums and divides once at the
end: averaging per-batch values would weight batches wrongly. A metric with nothing to measure
(no labelled pair, no valid entry) reports ``None``, never NaN. Legality compliance is measured on
the raw scores (how often LensNet itself points an illegal way) and after the hard mask that the
allocator applies (1.0 by construction; reported to prove it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.allocator import mask_illegal


def _ranks(x: Tensor) -> Tensor:
    """(B, N) rank of each entry within its row, 0 = largest (ties by position)."""
    order = torch.argsort(x, dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order)
    )


class MetricAccumulator:
    """Accumulates sums over batches; ``compute()`` returns the metrics dict."""

    def __init__(self, margin: float = 0.1, n_diff: int = 4, tau_expand: float = 0.2) -> None:
        self.margin, self.n_diff, self.tau_expand = margin, n_diff, tau_expand
        self.sums: dict[str, float] = {}

    def _add(self, key: str, value: Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    @torch.no_grad()
    def update(self, pred: Tensor, batch: dict[str, Tensor]) -> None:
        """Add one batch: ``pred`` (B, N) raw scores, ``batch`` as ``LensNetLoss`` takes it."""
        pred = pred.detach().double()
        valid = batch["valid_mask"].bool()
        mask = batch["action_mask"].bool() & valid
        y = torch.where(mask, batch["target_utilities"].double(), torch.zeros_like(pred))
        # ranking accuracy over the loss's pairs: same snapshot, both labelled, y_i > y_j + margin
        pairs = (y[:, :, None] > y[:, None, :] + self.margin) & mask[:, :, None] & mask[:, None, :]
        self._add("pairs", pairs.sum())
        self._add("pairs_correct", (pairs & (pred[:, :, None] > pred[:, None, :])).sum())
        # pooled Pearson and MSE over labelled entries
        u, t = pred[mask], y[mask]
        for key, v in (
            ("n", u.numel()),
            ("su", u.sum()),
            ("st", t.sum()),
            ("suu", (u * u).sum()),
            ("stt", (t * t).sum()),
            ("sut", (u * t).sum()),
            ("sse", ((u - t) ** 2).sum()),
        ):
            self._add(key, v)
        # budget balance |P - N| / (P + N) per snapshot, over snapshots with P + N > 0
        ec = batch["expand_cost"].double() * valid
        cr = batch["collapse_refund"].double() * valid
        p = (ec * pred.clamp_min(0)).sum(-1)
        q = (cr * (-pred).clamp_min(0)).sum(-1)
        has = (p + q) > 0
        self._add("balance_sum", ((p - q).abs()[has] / (p + q)[has]).sum())
        self._add("balance_n", has.sum())
        # legality over valid entries: does the score point a way the entry can go?
        can_expand = ec > 0
        can_collapse = cr > 0
        legal = lambda s: ((s <= 0) | can_expand) & ((s >= 0) | can_collapse)  # noqa: E731
        self._add("valid", valid.sum())
        self._add("legal_raw", (legal(pred) & valid).sum())
        self._add(
            "legal_masked", (legal(mask_illegal(pred, can_expand, can_collapse)) & valid).sum()
        )
        # precision@n_diff: of the k expands the labels call worth it (y > tau_expand, at most
        # n_diff, the best first), how many are among LensNet's k highest-scored gists
        expandable = can_expand & mask
        worth = expandable & (y > self.tau_expand)
        k = worth.sum(-1).clamp_max(self.n_diff)  # (B,)
        rank_y = _ranks(torch.where(expandable, y, -torch.inf))
        rank_u = _ranks(torch.where(expandable, pred, -torch.inf))
        hits = (rank_y < k[:, None]) & (rank_u < k[:, None]) & expandable
        self._add("expand_hits", hits.sum())
        self._add("expand_k", k.sum())

    def compute(self) -> dict[str, float | None]:
        s = self.sums
        ratio = lambda a, b: s[a] / s[b] if s.get(b, 0) > 0 else None  # noqa: E731
        n = s.get("n", 0.0)
        pearson = None
        if n > 1:
            cov = s["sut"] - s["su"] * s["st"] / n
            var_u = s["suu"] - s["su"] ** 2 / n
            var_t = s["stt"] - s["st"] ** 2 / n
            if var_u > 1e-12 and var_t > 1e-12:
                pearson = cov / (var_u * var_t) ** 0.5
        return {
            "ranking_accuracy": ratio("pairs_correct", "pairs"),
            "pearson": pearson,
            "budget_balance": ratio("balance_sum", "balance_n"),
            "legality_compliance_raw": ratio("legal_raw", "valid"),
            "legality_compliance": ratio("legal_masked", "valid"),
            "mse": ratio("sse", "n"),
            "precision_at_n_diff": ratio("expand_hits", "expand_k"),
        }


def compute_metrics(
    pred: Tensor, batch: dict[str, Tensor], margin: float = 0.1
) -> dict[str, float | None]:
    """All metrics for one batch."""
    acc = MetricAccumulator(margin)
    acc.update(pred, batch)
    return acc.compute()
