"""The LensNet checkpoints shipped as package data (``lensnet/checkpoints``), each with a JSON card
(command, seed, data split, held-out metrics, the LM and the task kind it was trained for);
``sim.evaluate`` loads by default only the one that fits both its LM and its tasks' kind."""

from __future__ import annotations

import json
from pathlib import Path

import lensnet
from gistnet.gister import lm_fingerprint  # one fingerprint for every checkpoint that fits an LM

CHECKPOINT_DIR = Path(lensnet.__file__).resolve().parent / "checkpoints"
TASKS_CHECKPOINT = CHECKPOINT_DIR / "lensnet-smollm2-tasks.pt"


def read_card(path: str | Path) -> dict:
    """The JSON card beside a checkpoint; a missing or unreadable card is an error."""
    card = Path(path).with_suffix(".json")
    try:
        out = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{card}: unreadable LensNet card ({type(err).__name__}: {err})") from err
    if not isinstance(out, dict):
        raise ValueError(f"{card}: a LensNet card must be a JSON object")
    return out


def default_lensnet_path(lm, kind: str | None) -> Path | None:
    """The shipped task-world LensNet when its card's LM fingerprint matches ``lm`` and it fits the
    tasks: a LensNet trained across every kind (card ``task`` 'all', ``sim.tasktrain``) fits any
    task file, of any or unnamed kind (the JSONL contract has no kind field); one trained for a
    single kind fits only tasks of that kind (a LensNet trained on pass keys is not the default for
    variable tracking, nor for a file whose kind is unknown). Else None."""
    if not TASKS_CHECKPOINT.exists():
        return None
    card = read_card(TASKS_CHECKPOINT)
    if card.get("lm_fingerprint") != lm_fingerprint(lm):
        return None
    fits = card.get("task") == "all" or (kind is not None and card.get("task") == kind)
    return TASKS_CHECKPOINT if fits else None


def shipped_lensnet_task() -> str | None:
    """The task kind the shipped task-world LensNet was trained on (None when none is shipped)."""
    return read_card(TASKS_CHECKPOINT).get("task") if TASKS_CHECKPOINT.exists() else None


def ship(lensnet_pt: str | Path, card: dict) -> None:
    """Make ``lensnet_pt`` with its ``card`` the task-world default (``--lensnet auto``): both
    copied into lensnet/checkpoints."""
    import shutil

    CHECKPOINT_DIR.mkdir(exist_ok=True)
    shutil.copyfile(lensnet_pt, TASKS_CHECKPOINT)
    TASKS_CHECKPOINT.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
