"""GistNet's training text and the project's one text split: Python's pydoc prose plus the standard
library's source, split three ways (task generation, ``sim.tasks``, uses the same split).

Both ship with the interpreter (no download; DESIGN §7), so their content depends on the Python
version, which every card records (``corpus_card``). Splits (deterministic, disjoint):

* **prose** (``pydoc_data.topics``): ``heldout`` = the held-out topics of
``megacontext.lm.pydoc_topics``
  (every 10th by sorted name; the GistNet benchmark and the LM world's evaluation documents read
  them); ``validation`` = the other topics whose name hashes to bucket 0 of 10; ``train`` = the
  rest.
* **code** (``sysconfig.get_paths()["stdlib"]``, ``*.py``): split by *top-level* module or package
  name (``asyncio`` holds ``asyncio.tasks``: no package has files on two sides), hash bucket 0 of 10
  = ``heldout``, 1 = ``validation``, the rest ``train``. Left out: test suites (``test``,
  ``tests``, ``idle_test`` folders), ``pydoc_data`` (the prose itself: its held-out topics must not
  reach training as code) and ``encodings`` (codec tables), and installed packages.

Checkpoint choice uses ``validation`` only; studies report on ``heldout``. The task generator
(``sim.tasks``) draws its ``heldout`` tasks from ``heldout`` and its ``train`` tasks from ``train``
only, so no GistNet trained on this split has read a held-out task's text. Texts of one split are
joined in sorted name order with blank lines between them, tokenised once per tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sysconfig
from pathlib import Path
from typing import Literal

import numpy as np

Corpus = Literal["pydoc", "stdlib"]
Split = Literal["train", "validation", "heldout"]
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
CORPORA: tuple[str, ...] = ("pydoc", "stdlib")
STDLIB_SKIP_TOP = frozenset({"test", "pydoc_data", "encodings", "site-packages", "dist-packages"})
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)

_TOKEN_CACHE: dict[tuple[int, str, str], np.ndarray] = {}


def name_bucket(name: str, n: int) -> int:
    """A stable hash bucket of ``name`` in ``0..n-1`` (sha256: the same on every machine and run).
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % n


def _check(corpus: str, split: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def pydoc_split(split: Split) -> list[str]:
    """Names of the pydoc topics in ``split``."""
    from megacontext.lm import pydoc_topics

    _check("pydoc", split)
    if split == "heldout":
        return pydoc_topics("heldout")
    return [
        t for t in pydoc_topics("train") if (name_bucket(t, 10) == 0) == (split == "validation")
    ]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_modules() -> dict[str, Path]:
    """Every kept standard-library source file: dotted module name -> path (the one list the GistNet
    corpus and the task generator read; do not mutate)."""
    root = stdlib_root()
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in STDLIB_SKIP_TOP or any(p in STDLIB_SKIP_DIRS for p in parts[:-1]):
            continue
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def stdlib_split_of(module: str) -> str:
    """The split of a dotted module name (decided by its top-level name)."""
    bucket = name_bucket(module.split(".")[0], 10)
    return "heldout" if bucket == 0 else "validation" if bucket == 1 else "train"


def stdlib_split(split: Split) -> list[str]:
    """Dotted names of the standard-library modules in ``split``."""
    _check("stdlib", split)
    return [m for m in stdlib_modules() if stdlib_split_of(m) == split]


def corpus_text(corpus: Corpus, split: Split) -> str:
    """The raw text of one corpus split."""
    _check(corpus, split)
    if corpus == "pydoc":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[t] for t in pydoc_split(split))
    mods = stdlib_modules()
    return "\n\n".join(
        mods[m].read_text(encoding="utf-8", errors="replace") for m in stdlib_split(split)
    )


def corpus_token_ids(tokenizer, corpus: Corpus, split: Split) -> np.ndarray:
    """Token ids of one corpus split, tokenised once per tokenizer. pydoc: the joined text in one
    call (the held-out ids equal ``megacontext.lm.pydoc_token_ids(tokenizer, 'heldout')``); stdlib:
    each
    module alone, joined by the ids of a blank line (long files, one batched call)."""
    _check(corpus, split)
    key = (id(tokenizer), corpus, split)
    if key not in _TOKEN_CACHE:
        if corpus == "pydoc":
            ids = tokenizer(corpus_text("pydoc", split), verbose=False).input_ids
        else:
            mods = stdlib_modules()
            texts = [
                mods[m].read_text(encoding="utf-8", errors="replace") for m in stdlib_split(split)
            ]
            sep = tokenizer("\n\n", add_special_tokens=False).input_ids
            ids = []
            for i, chunk in enumerate(
                tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
            ):
                ids.extend((sep if i else []) + list(chunk))
        _TOKEN_CACHE[key] = np.asarray(ids, dtype=np.int64)
    return _TOKEN_CACHE[key]


def corpus_card() -> dict:
    """What a checkpoint card records about its text: Python version, the split rules and sizes."""
    mods = stdlib_modules()
    return {
        "python": platform.python_version(),
        "stdlib": str(stdlib_root()),
        "rules": {
            "pydoc": "heldout = megacontext.lm.pydoc_topics('heldout') (sorted index % 10 == 9); "
            "validation = other topics with sha256(name) bucket 0 of 10; train = the rest",
            "stdlib": "by top-level module: sha256(top) bucket 0 of 10 = heldout, 1 = validation, "
            "else train; "
            f"skipped: top-level {sorted(STDLIB_SKIP_TOP)}, folders {sorted(STDLIB_SKIP_DIRS)}",
        },
        "pydoc_topics": {s: len(pydoc_split(s)) for s in SPLITS},
        "stdlib_modules": {s: sum(stdlib_split_of(m) == s for m in mods) for s in SPLITS},
        "stdlib_heldout_top": sorted(
            {m.split(".")[0] for m in mods if stdlib_split_of(m) == "heldout"}
        ),
        "stdlib_validation_top": sorted(
            {m.split(".")[0] for m in mods if stdlib_split_of(m) == "validation"}
        ),
    }
