"""The level-balanced L_reg diagnostic: ``sim.run`` with DESIGN's plain L_reg replaced, through a
patch
of ``LensNetLoss.forward``, by the mean over tree levels of each level's mean squared error.

This is how the balanced loss was measured before it became ``TrainConfig.reg_balance='levels'``
(the shipped default, which computes the same loss with one scatter instead of a loop over levels,
so the float sums differ and the training trajectories part after a few hundred steps). Its run is
``results/synthetic-seed0-balance-diagnostic/``; comparing it with ``results/synthetic-seed0/``
shows the run-to-run spread of LensNet's metrics.

    python -m benchmarks.balance_diagnostic --out runs/exp-bal --no-progress --no-plots

Every ``sim.run`` flag works; ``--train.reg-balance entries`` is forced (the patch replaces that
term).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

import lensnet.losses as losses
from megacontext.cli import parse
from sim.run import RunArgs, run

_plain_forward = losses.LensNetLoss.forward


def _balanced_forward(
    self: losses.LensNetLoss, predictions: Tensor, batch: dict[str, Tensor]
) -> dict[str, Tensor | float]:
    """LensNetLoss.forward with L_reg = mean over levels present of that level's mean (u - y)^2."""
    assert self.reg_balance == "entries", "the patch replaces the plain L_reg term"
    out = _plain_forward(self, predictions, batch)
    mask = batch["action_mask"].bool() & batch["valid_mask"].bool()
    per_level = [
        losses.regression_loss(
            predictions, batch["target_utilities"], mask & (batch["levels"] == level)
        )
        for level in range(self.max_level + 1)
        if (mask & (batch["levels"] == level)).any()
    ]
    balanced = torch.stack(per_level).mean() if per_level else predictions.sum() * 0.0
    plain = losses.regression_loss(predictions, batch["target_utilities"], mask)
    out["loss"] = out["loss"] - plain + balanced
    out["L_reg"] = balanced.detach().item()
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    losses.LensNetLoss.forward = _balanced_forward  # type: ignore[method-assign]
    run(parse(RunArgs, [*argv, "--train.reg-balance", "entries"]))


if __name__ == "__main__":
    main()
