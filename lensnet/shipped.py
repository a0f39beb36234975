"""The LensNet checkpoints shipped as package data (``lensnet/checkpoints``), each with a JSON card
(command, seed, data split, held-out metrics, the LM it was trained for); ``sim.evaluate`` loads
the one that fits its LM by default."""

from __future__ import annotations

import json
from pathlib import Path

from gistnet.gister import lm_fingerprint  # one fingerprint for every checkpoint that fits an LM

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
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


def default_lensnet_path(lm) -> Path | None:
    """The shipped task-world LensNet when its card's LM fingerprint matches ``lm``, else None."""
    if not TASKS_CHECKPOINT.exists():
        return None
    return TASKS_CHECKPOINT if read_card(TASKS_CHECKPOINT).get("lm_fingerprint") == lm_fingerprint(lm) else None
