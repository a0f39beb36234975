"""LensNet's four counterfactual losses (DESIGN.md §5), fully vectorised over snapshots and pairs.

Shapes: B snapshots, N entries (padded). ``mask`` / ``action_mask`` marks entries with a label,
``valid_mask`` entries that are not padding. Every term is 0 (never NaN) when its mask is empty,
and masked-out targets may hold anything, NaN included, without reaching values or gradients.
``lensnet/reference_losses.py`` is the loop implementation the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megacontext.tree import ConfigError

BATCH_KEYS = (
    "target_utilities",
    "action_mask",
    "valid_mask",
    "levels",
    "span_width",
    "expand_cost",
    "collapse_refund",
)


def _safe_target(target: Tensor, mask: Tensor) -> Tensor:
    # Zero the unlabelled targets first: pred - NaN would poison the gradient even under a mask.
    return torch.where(mask, target, torch.zeros_like(target))


def regression_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L_reg: mean over labelled entries of (u - y)^2; 0 when nothing is labelled."""
    mask = mask.bool()
    sq = torch.where(mask, (pred - _safe_target(target, mask)) ** 2, torch.zeros_like(pred))
    return sq.sum() / mask.sum().clamp_min(1)


def level_balanced_regression_loss(
    pred: Tensor, target: Tensor, mask: Tensor, levels: Tensor, n_levels: int
) -> Tensor:
    """L_reg with every tree level weighted alike: the mean, over the levels that have labelled
    entries in the batch, of that level's mean (u - y)^2; 0 when nothing is labelled. (Token entries
    outnumber gists ~3:1 and most gist labels are 0, so the plain mean lets the rare expand gains
    shrink towards 0.)"""
    mask = mask.bool()
    sq = torch.where(
        mask, (pred - _safe_target(target, mask)) ** 2, torch.zeros_like(pred)
    ).reshape(-1)
    lv = levels.clamp(0, n_levels - 1).reshape(-1)
    sums = sq.new_zeros(n_levels).index_add_(0, lv, sq)
    counts = sq.new_zeros(n_levels).index_add_(0, lv, mask.reshape(-1).to(sq.dtype))
    present = counts > 0
    per_level = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return per_level.sum() / present.sum().clamp_min(1)


# Above this spread of predictions within a snapshot, exp(u_j - u_i) could overflow float32 in the
# paired-log path (T <= e^spread, (1+T)^2 < e^88.7): such chunks take the direct softplus path.
_MAX_SPREAD = 40.0
_CHUNK_PAIRS = 2**20  # pair-matrix elements per chunk: keeps the work buffers cache-resident


def _pair_ranks(target: Tensor, mask: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Integer codes with [y_i > y_j + margin] == [rank_j < k_i] for labelled i, j (and 0
    otherwise).

    k_i = #{labelled j: y_j + margin < y_i}; rank_j = #{labelled l: y_l + margin < y_j + margin}
    (the first sorted position of its value); unlabelled rows get k = 0, columns rank = N + 1.
    """
    big = torch.finfo(target.dtype).max
    shifted = torch.where(mask, target + margin, torch.full_like(target, big))
    sorted_shifted = shifted.sort(dim=-1).values  # (B, N), unlabelled last
    n_lab = mask.sum(-1, keepdim=True)
    k = torch.searchsorted(sorted_shifted, target.contiguous(), side="left").clamp_max(n_lab)
    k = torch.where(mask, k, torch.zeros_like(k))
    rank = torch.searchsorted(sorted_shifted, shifted, side="left")
    rank = torch.where(mask, rank, torch.full_like(rank, target.shape[-1] + 1))
    return k, rank


class _PairSoftplusSum(torch.autograd.Function):
    """sum over pairs (i, j) with rank_j < k_i of softplus(u_j - u_i), with its gradient computed in
    the same sweep. exp(u_j - u_i) = exp(c - u_i) exp(u_j - c) is an outer product, so the only
    per-pair transcendental is one log1p per *two* pairs: log(1+T1) + log(1+T2) = log1p(T1+T2+T1T2).
    Sums are float32 (cascade summation) accumulated in float64 across chunks."""

    @staticmethod
    def forward(ctx, pred: Tensor, k: Tensor, rank: Tensor) -> Tensor:  # type: ignore[override]
        b, n = pred.shape
        want_grad = ctx.needs_input_grad[0]
        dtype = pred.dtype
        pred = pred.detach()
        if n % 2:  # pad one never-paired column so columns pair up
            pred = torch.cat([pred, pred.new_zeros(b, 1)], dim=1)
            rank = torch.cat([rank, rank.new_full((b, 1), n + 2)], dim=1)
        labelled = k > 0
        any_pair = labelled.any(-1, keepdim=True)
        lo = torch.where(rank[:, :n] <= n, pred[:, :n], torch.inf).amin(-1, keepdim=True)
        hi = torch.where(rank[:, :n] <= n, pred[:, :n], -torch.inf).amax(-1, keepdim=True)
        centre = torch.where(any_pair & torch.isfinite(lo), (lo + hi) / 2, torch.zeros_like(lo))
        spread = torch.where(any_pair & torch.isfinite(lo), hi - lo, torch.zeros_like(lo)).squeeze(
            -1
        )
        a = torch.exp((pred - centre).clamp(max=_MAX_SPREAD))  # a_j, (B, N')
        inv = torch.exp((centre - pred[:, :n]).clamp(max=_MAX_SPREAD))  # b_i, (B, N)
        kf, rankf = k.to(dtype), rank.to(dtype)
        total = pred.new_zeros((), dtype=torch.float64)
        dev = pred.device
        grad = torch.zeros(b, n, dtype=dtype, device=dev) if want_grad else None
        chunk = max(1, _CHUNK_PAIRS // (n * n))
        n2 = pred.shape[1]
        # Work buffers allocated once and reused by every chunk (fresh large tensors cost page
        # faults).
        m_buf = torch.empty(chunk, n, n2, dtype=dtype, device=dev)
        t_buf = torch.empty(chunk, n, n2, dtype=dtype, device=dev)
        q_buf = torch.empty(chunk, n, n2 // 2, dtype=dtype, device=dev)
        for s0 in range(0, b, chunk):  # chunks of whole snapshots; everything inside is batched
            s1 = min(s0 + chunk, b)
            m, t, q = m_buf[: s1 - s0], t_buf[: s1 - s0], q_buf[: s1 - s0]
            torch.sub(kf[s0:s1, :, None], rankf[s0:s1, None, :], out=m).clamp_(
                0, 1
            )  # 0/1 pair mask
            if bool((spread[s0:s1] > _MAX_SPREAD).any()):
                torch.sub(pred[s0:s1, None, :], pred[s0:s1, :n, None], out=t)  # u_j - u_i
                total += (F.softplus(t) * m).sum().double()
                if want_grad:
                    t.sigmoid_().mul_(m)
            else:
                torch.mul(inv[s0:s1, :, None], a[s0:s1, None, :], out=t).mul_(
                    m
                )  # exp(u_j - u_i) on pairs
                te, to = t[..., : n2 // 2], t[..., n2 // 2 :]  # pair column j with j + N'/2
                torch.mul(te, to, out=q).add_(te).add_(to).log1p_()
                total += q.sum().double()
                if want_grad:
                    t.div_(torch.add(t, 1, out=m))  # sigmoid(u_j - u_i) on pairs, 0 elsewhere
            if want_grad:
                grad[s0:s1] += t[..., :n].sum(1) - t.sum(2)  # d/du_j: +sigmoid, d/du_i: -sigmoid
        if want_grad:
            ctx.save_for_backward(grad)
        return total.to(dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def ranking_loss(pred: Tensor, target: Tensor, mask: Tensor, margin: float = 0.1) -> Tensor:
    """L_rank: mean over ordered pairs (i, j) in one snapshot, both labelled, y_i > y_j + margin,
    of softplus(-(u_i - u_j)); 0 when there are no such pairs."""
    mask = mask.bool()
    k, rank = _pair_ranks(_safe_target(target, mask), mask, margin)
    n_pairs = k.sum()
    return _PairSoftplusSum.apply(pred, k, rank) / n_pairs.clamp_min(1).to(pred.dtype)


def budget_loss(
    pred: Tensor, expand_cost: Tensor, collapse_refund: Tensor, eps: float = 1e-6
) -> Tensor:
    """L_budget: mean over snapshots of ((P - N) / (eps + P + N))^2 with P = sum c+ ReLU(u),
    N = sum c- ReLU(-u). Padding must carry zero costs."""
    p = (expand_cost * F.relu(pred)).sum(dim=-1)  # (B,)
    n = (collapse_refund * F.relu(-pred)).sum(dim=-1)  # (B,)
    return (((p - n) / (eps + p + n)) ** 2).mean()


def illegality_loss(
    pred: Tensor,
    levels: Tensor,
    valid_mask: Tensor,
    max_level: int,
    alpha: float = 0.3,
    beta: float = 0.3,
) -> Tensor:
    """L_illegal: alpha * mean over valid entries of [level = 0] ReLU(u)
    + beta * mean over valid entries of [level = max_level] ReLU(-u); 0 with no valid entry."""
    valid = valid_mask.bool()
    zero = torch.zeros_like(pred)
    expand_l0 = torch.where(valid & (levels == 0), F.relu(pred), zero)
    collapse_top = torch.where(valid & (levels == max_level), F.relu(-pred), zero)
    n = valid.sum().clamp_min(1)
    return alpha * expand_l0.sum() / n + beta * collapse_top.sum() / n


@dataclass(frozen=True)
class LossConfig:
    """LensNet's loss: L = L_reg + lambda_rank L_rank + lambda_budget L_budget + L_illegal (DESIGN
    §5)."""

    lambda_rank: float = 0.5
    """Weight of the pairwise ranking term L_rank."""
    lambda_budget: float = 0.1
    """Weight of the budget-balance term L_budget."""
    alpha_illegal: float = 0.3
    """L_illegal: penalty on a positive score of an L0 entry (which cannot expand)."""
    beta_illegal: float = 0.3
    """L_illegal: penalty on a negative score of a top-level gist (which cannot collapse)."""
    margin: float = 0.1
    """L_rank: target gap (nats) below which a pair is not ranked."""
    reg_balance: Literal["entries", "levels"] = "levels"
    """L_reg averaged over labelled entries (DESIGN's definition) or per tree level, then over
    levels (default: token entries outnumber gists about 3:1 and most gist labels are 0)."""

    def __post_init__(self) -> None:
        for name in ("lambda_rank", "lambda_budget", "alpha_illegal", "beta_illegal", "margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss.{name} must be a finite number >= 0, got {value}")


class LensNetLoss(nn.Module):
    """L = L_reg + lambda_rank L_rank + lambda_budget L_budget + L_illegal (DESIGN §5).

    ``reg_balance``: 'entries' is DESIGN's L_reg (mean over labelled entries); 'levels' weights each
    tree level alike (``level_balanced_regression_loss``). ``TERMS`` names the terms every call
    returns; a training loop logs each of them."""

    TERMS = ("L_reg", "L_rank", "L_budget", "L_illegal")

    def __init__(
        self,
        lambda_rank: float = 0.5,
        lambda_budget: float = 0.1,
        alpha_illegal: float = 0.3,
        beta_illegal: float = 0.3,
        max_level: int = 2,
        margin: float = 0.1,
        reg_balance: str = "entries",
    ) -> None:
        super().__init__()
        if reg_balance not in ("entries", "levels"):
            raise ValueError(f"reg_balance must be 'entries' or 'levels', got {reg_balance!r}")
        self.reg_balance = reg_balance
        self.lambda_rank, self.lambda_budget = lambda_rank, lambda_budget
        self.alpha_illegal, self.beta_illegal = alpha_illegal, beta_illegal
        self.max_level, self.margin = max_level, margin

    @classmethod
    def from_config(cls, config: LossConfig, max_level: int) -> LensNetLoss:
        """The loss a ``LossConfig`` describes, for a tree of ``max_level``."""
        return cls(**asdict(config), max_level=max_level)

    def forward(self, predictions: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor | float]:
        """``predictions`` (B, N); ``batch`` holds ``BATCH_KEYS``, each (B, N). Returns ``loss`` (a
        tensor) and each term of ``TERMS`` as a float."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks keys {missing}")
        for k in BATCH_KEYS:
            if batch[k].shape != predictions.shape:
                raise ValueError(
                    f"batch[{k!r}] has shape {tuple(batch[k].shape)}, "
                    f"predictions {tuple(predictions.shape)}"
                )
        valid = batch["valid_mask"].bool()
        mask = batch["action_mask"].bool() & valid
        target = batch["target_utilities"]
        if self.reg_balance == "levels":
            l_reg = level_balanced_regression_loss(
                predictions, target, mask, batch["levels"], self.max_level + 1
            )
        else:
            l_reg = regression_loss(predictions, target, mask)
        terms = {
            "L_reg": (1.0, l_reg),
            "L_rank": (self.lambda_rank, ranking_loss(predictions, target, mask, self.margin)),
            "L_budget": (
                self.lambda_budget,
                budget_loss(
                    predictions, batch["expand_cost"] * valid, batch["collapse_refund"] * valid
                ),
            ),
            "L_illegal": (
                1.0,
                illegality_loss(
                    predictions,
                    batch["levels"],
                    valid,
                    self.max_level,
                    self.alpha_illegal,
                    self.beta_illegal,
                ),
            ),
        }
        assert tuple(terms) == self.TERMS, "TERMS must name every term"
        loss = sum(weight * term for weight, term in terms.values())
        return {"loss": loss, **{name: term.detach().item() for name, (_, term) in terms.items()}}
