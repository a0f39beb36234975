"""The task generators' shared text plumbing: the train / dev / held-out split of GistNet's real
text (pydoc topics and standard-library modules, ``gistnet.corpus``: its train / validation /
held-out), the filler documents and paragraphs of each split (held-out ones never sharing text
with GistNet's train or validation text, dev ones with its train text), filler cut to a token
budget, needles placed at sentence or paragraph starts, and token counting (a tokenizer, a
callable, or ~4 characters a token).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gistnet.corpus import pydoc_split, stdlib_modules, stdlib_split_of
from megacontext.tree import ConfigError

SPLITS = ("train", "heldout", "dev")
"""The task splits, in seed order (a task's seed holds its split's index, so a new split is
appended): 'train' (training), 'dev' (selection and calibration: the task families only) and
'heldout' (test: the sealed splits draw from it)."""
GIST_SPLIT = {"train": "train", "dev": "validation", "heldout": "heldout"}
"""Task split -> GistNet's corpus split (``gistnet.corpus``) whose text it reads: dev tasks read
the text GistNet selects on, never the text it trains on."""
SEEN_BY = {"train": (), "dev": ("train",), "heldout": ("train", "validation")}
"""Task split -> the GistNet splits whose text its filler may not share (``shares_seen_text``)."""
_TASK_SPLIT = {gist: task for task, gist in GIST_SPLIT.items()}
MAX_GAP = 400
"""Filler paragraphs with a longer stretch without a sentence start (tables, long code) are left
out, so a needle always finds a sentence or paragraph start within MAX_GAP / 2 characters."""
CHARS_PER_TOKEN = 4.0
"""Characters per token when no tokenizer is given (English prose under a BPE of ~50k tokens)."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------- real text
def module_split(name: str) -> str:
    """The task split of a standard-library module: GistNet's (``gistnet.corpus.stdlib_split_of``,
    by top-level package; its 'validation' is the tasks' 'dev'), or 'none' for a pure-Python twin
    (``_py_abc`` of ``abc``) whose public twin lies in another split: its docstrings are copies of
    the twin's, so it serves neither split."""
    top = name.split(".")[0]
    split = stdlib_split_of(name)
    public = top[3:].lstrip("_") if top.startswith("_py") else top.lstrip("_")
    if public != top and public in stdlib_modules() and stdlib_split_of(public) != split:
        return "none"
    return _TASK_SPLIT[split]


def code_documents(split: str, min_chars: int = 4096) -> Iterator[tuple[str, str]]:
    """(module name, source) of every standard-library module of ``split`` with at least
    ``min_chars`` characters, in name order (long-range real text: module continuation)."""
    _check_split(split)
    for name, path in sorted(stdlib_modules().items()):
        if module_split(name) == split:
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) >= min_chars:
                yield name, text


@functools.cache
def filler_sources(split: str) -> tuple[str, ...]:
    """Filler documents of ``split``: ``pydoc:TOPIC`` (the topics of ``gistnet.corpus.pydoc_split``)
    and ``module:NAME`` (the docstrings of a module of that split)."""
    _check_split(split)
    mods = [f"module:{m}" for m in sorted(stdlib_modules()) if module_split(m) == split]
    return (*(f"pydoc:{t}" for t in pydoc_split(GIST_SPLIT[split])), *mods)


SHARED_RUN = 200
"""A held-out (dev) filler paragraph that shares a run of this many characters (whitespace
collapsed) with GistNet's train or validation (train) text is left out (pydoc topics repeat one
another's paragraphs)."""


@functools.cache
def _seen_windows(splits: tuple[str, ...] = ("train", "validation")) -> frozenset[str]:
    """Windows of SHARED_RUN / 2 characters at every multiple of SHARED_RUN / 2 of GistNet's text
    of ``splits`` (whitespace collapsed): a run of SHARED_RUN characters shared with that text holds
    one of them."""
    from gistnet.corpus import corpus_text

    seen = " ".join(corpus_text(c, s) for c in ("pydoc", "stdlib") for s in splits)
    seen, w = re.sub(r"\s+", " ", seen), SHARED_RUN // 2
    return frozenset(seen[i : i + w] for i in range(0, len(seen) - w + 1, w))


def shares_seen_text(paragraph: str, splits: tuple[str, ...] = ("train", "validation")) -> bool:
    """Whether ``paragraph`` shares SHARED_RUN characters (whitespace collapsed) with GistNet's text
    of ``splits`` (by default its train and validation text)."""
    p, w, seen = re.sub(r"\s+", " ", paragraph), SHARED_RUN // 2, _seen_windows(splits)
    return any(p[i : i + w] in seen for i in range(len(p) - w + 1))


def _source_split(source: str) -> str:
    kind, name = source.split(":", 1)
    if kind == "pydoc":
        return next(t for t, g in GIST_SPLIT.items() if name in pydoc_split(g))
    return module_split(name)


@functools.cache
def _paragraphs(source: str) -> tuple[str, ...]:
    """A filler document's paragraphs (blank-line separated); a module gives its docstrings of at
    least 200 characters (module, classes, functions, methods). A held-out document leaves out the
    paragraphs that share text with GistNet's train or validation text, a dev one those that share
    text with its train text (``shares_seen_text``, ``SEEN_BY``)."""
    kind, name = source.split(":", 1)
    if kind == "pydoc":
        import pydoc_data.topics as topics

        text = topics.topics[name]
    else:
        try:
            source_text = stdlib_modules()[name].read_text(encoding="utf-8", errors="replace")
            tree = ast.parse(source_text)
        except (SyntaxError, ValueError):
            return ()
        nodes = [tree, *tree.body]
        nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        defs = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(n) or "" for n in nodes if isinstance(n, defs)]
        text = "\n\n".join(d for d in docs if len(d) >= 200)
    paras = (p.rstrip() for p in re.split(r"\n\s*\n", text) if p.strip())
    paras = (p for p in paras if np.diff([0, *_sentence_starts(p), len(p)]).max() <= MAX_GAP)
    if seen := SEEN_BY[_source_split(source)]:
        paras = (p for p in paras if not shares_seen_text(p, seen))
    return tuple(paras)


def _sentence_starts(text: str) -> list[int]:
    """Where a sentence starts after [.!?] (and an optional closing quote or bracket)."""
    return [m.end() for m in re.finditer(r"[.!?][\"')]?[ \n]+(?=[A-Z\"(])", text)]


def approx_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: ``len(text) / CHARS_PER_TOKEN``, rounded up."""
    return int(np.ceil(len(text) / CHARS_PER_TOKEN))


def token_counter(tokenizer: Any = None) -> Callable[[str], int]:
    """``count_tokens(text)`` from a Hugging Face tokenizer, a callable, or None
    (``approx_tokens``)."""
    if tokenizer is None:
        return approx_tokens
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return tokenizer
    raise TypeError(
        f"count_tokens must be a tokenizer or a callable, got {type(tokenizer).__name__}"
    )


# ----------------------------------------------------------------------------- filler and needles
def _longest_prefix(text: str, ends: list[int], room: int, count: Callable[[str], int]) -> str:
    """The longest ``text[:e]`` (e in ascending ``ends``) of at most ``room`` tokens, or ''."""
    lo, hi = 0, len(ends)  # binary search: prefixes only grow
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[: ends[mid]]) <= room:
            lo = mid + 1
        else:
            hi = mid
    return text[: ends[lo - 1]] if lo else ""


def _filler(
    sources: list[str], budget: int, count: Callable[[str], int], slack: int, cycle: bool = False
) -> str:
    """Paragraphs of ``sources`` in order up to ``budget`` tokens; the last one is cut at a sentence
    end, or at a word end when that leaves more than ``slack`` tokens unused (a paragraph whose
    first word does not fit is passed over). ``cycle``: when the sources run out, start them
    again (a stream longer than the split's text repeats it; the task's meta says so)."""
    paras: list[str] = []
    used = 0
    while True:
        for source in sources:
            for p in _paragraphs(source):
                room = budget - used - 1  # - the paragraph break
                if count(p) > room:
                    cut = _longest_prefix(p, _sentence_starts(p), room, count).rstrip()
                    if room - count(cut) > slack:
                        word_ends = [m.start() for m in re.finditer(r"\s+", p)]
                        cut = _longest_prefix(p, word_ends, room, count)
                    if cut:
                        return "\n\n".join([*paras, cut])
                    continue
                paras.append(p)
                used += count(p) + 1
                if budget - used <= slack:
                    return "\n\n".join(paras)
        if not cycle or not paras:
            break
    raise ConfigError(
        f"the filler text ({len(sources)} documents) holds fewer than {budget} tokens"
        + ("" if cycle else " (--cycle-filler repeats it)")
    )


def _place(filler: str, needles: list[tuple[str, float]]) -> tuple[str, list[list[int]]]:
    """Insert each (needle, depth) at the sentence or paragraph start nearest fraction ``depth`` of
    the final context, in depth order (ties keep list order); returns (context, spans)."""
    starts = {0: "para", len(filler): "end"}
    starts |= {m.end(): "para" for m in re.finditer("\n\n", filler)}
    for p in _sentence_starts(filler):
        starts.setdefault(p, "sentence")
    pos = np.array(sorted(starts))
    total = len(filler) + sum(len(text) + 2 for text, _ in needles)
    pieces: list[str] = []
    spans: list[list[int]] = [[] for _ in needles]
    prev = k = shift = n = 0
    for j in sorted(range(len(needles)), key=lambda j: needles[j][1]):
        text, depth = needles[j]
        k += int(np.argmin(np.abs(pos[k:] - (depth * total - shift))))  # never before the last one
        p = int(pos[k])
        if starts[p] == "end":
            lead, trail = "\n\n", ""
        else:
            lead, trail = "", "\n\n" if starts[p] == "para" else " "
        pieces += [filler[prev:p], lead + text + trail]
        n += p - prev
        spans[j] = [n + len(lead), n + len(lead) + len(text)]
        n, prev, shift = n + len(lead + text + trail), p, shift + len(text) + 2
    return "".join([*pieces, filler[prev:]]), spans
