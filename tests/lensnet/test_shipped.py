"""The shipped task-world LensNet: it loads, and the default is chosen only for the LM it was trained for."""

import json
from types import SimpleNamespace

import torch

from lensnet.shipped import TASKS_CHECKPOINT, default_lensnet_path, lm_fingerprint, read_card
from lensnet.train import load_model


def _lm(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_shipped_lensnet_loads_and_fits_only_its_lm():
    card = read_card(TASKS_CHECKPOINT)
    fp = card["lm_fingerprint"]
    smollm2 = _lm(**fp)
    assert lm_fingerprint(smollm2) == fp and default_lensnet_path(smollm2) == TASKS_CHECKPOINT
    assert default_lensnet_path(_lm(**{**fp, "hidden_size": 64})) is None  # e.g. the tiny test LM
    model = load_model(TASKS_CHECKPOINT)
    assert model.config.d_model == fp["hidden_size"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key in ("command", "seed", "train_tasks", "validation", "heldout"):
        assert key in card, key
    assert json.dumps(card)  # a plain JSON card
