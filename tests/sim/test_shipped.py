"""The shipped task-world LensNet: it loads, and the default is chosen only for the LM it was
trained for and for tasks it fits (a cross-kind card: any task file; a per-kind card: only its
kind)."""

import json
from types import SimpleNamespace

import torch

import sim.shipped as shipped
from lensnet.train import load_model
from sim.shipped import TASKS_CHECKPOINT, default_lensnet_path, lm_fingerprint, read_card

KINDS = {"passkey", "multikey", "vt", "code"}


def _lm(**config):
    return SimpleNamespace(config=SimpleNamespace(**config))


def test_shipped_lensnet_loads_and_fits_only_its_lm():
    card = read_card(TASKS_CHECKPOINT)
    fp = card["lm_fingerprint"]
    smollm2 = _lm(**fp)
    assert lm_fingerprint(smollm2) == fp
    tiny = _lm(**{**fp, "hidden_size": 64})  # e.g. the tiny test LM
    for kind in KINDS | {None}:
        assert default_lensnet_path(tiny, kind) is None
        fits = card["task"] == "all" or kind == card["task"]
        assert default_lensnet_path(smollm2, kind) == (TASKS_CHECKPOINT if fits else None), kind
    model = load_model(TASKS_CHECKPOINT)
    assert model.config.d_model == fp["hidden_size"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # its input width is that of the feature set it names (the task world builds that set for it)
    from sim.taskworld.keystore import n_entry_features

    width = n_entry_features(fp["num_hidden_layers"], model.config.feature_set)
    assert model.config.n_entry_features == width == card["inputs"]["n_entry_features"]
    assert card["inputs"].get("feature_set", "attention") == model.config.feature_set
    for key in ("command", "seed", "validation"):
        assert key in card, key
    assert json.dumps(card)  # a plain JSON card


def test_a_per_kind_card_is_never_taken_for_another_kind(tmp_path, monkeypatch):
    fp = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10}
    ckpt = tmp_path / "lensnet-tasks.pt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(shipped, "TASKS_CHECKPOINT", ckpt)
    for task, fits in (("passkey", {"passkey"}), ("all", KINDS | {None})):
        ckpt.with_suffix(".json").write_text(json.dumps({"task": task, "lm_fingerprint": fp}))
        for kind in KINDS | {None}:
            want = ckpt if kind in fits else None
            assert shipped.default_lensnet_path(_lm(**fp), kind) == want, (task, kind)
