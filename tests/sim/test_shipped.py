"""The shipped task-world LensNet: it loads, and the default is chosen only for the LM and the task
kind it was trained for."""

import json
from types import SimpleNamespace

import torch

from lensnet.train import load_model
from sim.shipped import TASKS_CHECKPOINT, default_lensnet_path, lm_fingerprint, read_card


def _lm(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_shipped_lensnet_loads_and_fits_only_its_lm():
    card = read_card(TASKS_CHECKPOINT)
    fp = card["lm_fingerprint"]
    smollm2 = _lm(**fp)
    kind = card["task"]
    assert lm_fingerprint(smollm2) == fp and default_lensnet_path(smollm2, kind) == TASKS_CHECKPOINT
    assert (
        default_lensnet_path(_lm(**{**fp, "hidden_size": 64}), kind) is None
    )  # e.g. the tiny test LM
    for other in ({"passkey", "multikey", "vt", "code"} - {kind}) | {
        None
    }:  # never silently another kind
        assert default_lensnet_path(smollm2, other) is None, other
    model = load_model(TASKS_CHECKPOINT)
    assert model.config.d_model == fp["hidden_size"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key in ("command", "seed", "train_tasks", "validation", "heldout"):
        assert key in card, key
    assert json.dumps(card)  # a plain JSON card
