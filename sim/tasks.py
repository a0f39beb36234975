"""Long-context task generators (DESIGN.md §9, RULER-style): pass key, multi-key needle, variable
tracking, plus whole standard-library modules as long-range real text.

A task is one JSON line ``{"id", "context", "question", "answer", "needle_spans", "meta"}``: the LM
reads ``context + question`` as one stream and the answer (a leading-space string such as
``" 48213"``) is scored as its continuation; ``needle_spans`` are the ``[start, end)`` character spans
of ``context`` that hold what the answer needs. Filler is real text (§7): the pydoc topics of the
split plus the docstrings of the split's standard-library modules, never repeated sentences. The
split is GistNet's (``gistnet.corpus``: pydoc topics and standard-library modules, by top-level
package, into train / validation / held-out): held-out tasks read held-out text only, training tasks
training text only (the validation text is used by neither), so train and held-out share neither
filler text nor modules, no GistNet trained on that split has read a held-out task, and the needle
and question phrasings (``TEMPLATES``) of the two splits are disjoint too. A length N
means context + question + answer hold at most N tokens (so a task fits an LM with N positions),
usually within 1% and never fewer than N - max(24, 3% of N), under a ``count_tokens`` callable (a
tokenizer, or ~4 characters a token). Depth d puts the asked needle at fraction d of the context's
characters, at a sentence or paragraph start. Every draw comes from a seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import keyword
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gistnet.corpus import pydoc_split, stdlib_modules, stdlib_split_of
from sim.tree import ConfigError

KINDS = ("passkey", "multikey", "vt")
"""The needle kinds (RULER-style: filler + needles + a question)."""
ALL_KINDS = (*KINDS, "code")
"""``code``: continuation of a standard-library module where the next lines use a name defined far above."""
SPLITS = ("train", "heldout")
CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"
MAX_GAP = 400
"""Filler paragraphs with a longer stretch without a sentence start (tables, long code) are left
out, so a needle always finds a sentence or paragraph start within MAX_GAP / 2 characters."""
CHARS_PER_TOKEN = 4.0
"""Characters per token when no tokenizer is given (English prose under a BPE of ~50k tokens)."""

# kind -> split -> [(needle, hop (vt only), question)]: {v} value, {k} key, {a} -> {b} a vt hop.
_MAGIC = "the special magic number for {k} mentioned in the provided text"
TEMPLATES: dict[str, dict[str, list[tuple[str, str, str]]]] = {
    "passkey": {
        "train": [("The pass key is {v}. Remember it. {v} is the pass key.", "", "What is the pass key? The pass key is"),
                  ("Keep this number in mind: the secret number is {v}. Once more, the secret number is {v}.", "",
                   "Recall the secret number from the text. The secret number is")],
        "heldout": [("The secret access code is {v}. Do not forget it: {v} is the secret access code.", "",
                     "What is the secret access code? The secret access code is"),
                    ("Note well that the hidden PIN equals {v}. Again, the hidden PIN equals {v}.", "",
                     "Which value does the hidden PIN equal? The hidden PIN equals")],
    },
    "multikey": {
        "train": [("One of the special magic numbers for {k} is: {v}.", "", f"What is {_MAGIC}? {_MAGIC.capitalize()} is"),
                  ("The registered number of the {k} is {v}.", "",
                   "What is the registered number of the {k}? The registered number of the {k} is")],
        "heldout": [("Among the catalogue entries, the reference code for {k} reads {v}.", "",
                     "Which reference code was listed for {k} above? The reference code for {k} reads"),
                    ("Record: {k} has serial {v}.", "", "What serial does {k} have? Per the record, {k} has serial")],
    },
    "vt": {
        "train": [("VAR {a} = {v}.", "VAR {b} = VAR {a}.", "Find all variables that are assigned the value {v} in the "
                   "text above. Answer: in order, the variables assigned the value {v} are"),
                  ("The variable {a} is set to {v}.", "The variable {b} is set to the value of {a}.",
                   "Which variables hold the value {v}? In order of assignment, they are")],
        "heldout": [("Let {a} equal {v}.", "Let {b} equal {a}.",
                     "Trace the number {v} through the passage. Listed in sequence, the names equal to {v} are"),
                    ("Assign {v} to {a}.", "Copy {a} into {b}.",
                     "Which names receive the number {v}? Following each copy, they are")],
    },
}
KEY_WORDS = tuple("""apple badger candle dolphin emerald falcon garnet harbor iris jasmine kettle lantern
maple nectar otter pepper quartz raven saddle tulip urchin violet walrus yarrow zephyr anchor bramble
cobalt dune feather glacier hazel ivory juniper kiwi lotus meadow nutmeg orchid pebble quill ribbon
sparrow thistle velvet willow""".split())
"""Multi-key keys (the same for both splits: keys are neither filler nor phrasing)."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


class TaskFileError(ValueError):
    """A task file line that is not a valid task; the message names the file and line."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}: line {line}: {problem}")


# ----------------------------------------------------------------------------- real text
def module_split(name: str) -> str:
    """The split of a standard-library module: GistNet's (``gistnet.corpus.stdlib_split_of``, by
    top-level package), or 'none' for a pure-Python twin (``_py_abc`` of ``abc``) whose public twin
    lies in another split: its docstrings are copies of the twin's, so it serves neither split."""
    top = name.split(".")[0]
    split = stdlib_split_of(name)
    public = top[3:].lstrip("_") if top.startswith("_py") else top.lstrip("_")
    if public != top and public in stdlib_modules() and stdlib_split_of(public) != split:
        return "none"
    return split


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
    return (*(f"pydoc:{t}" for t in pydoc_split(split)), *mods)


SHARED_RUN = 200
"""A held-out filler paragraph that shares a run of this many characters (whitespace collapsed) with
GistNet's train or validation text is left out (pydoc topics repeat one another's paragraphs)."""


@functools.cache
def _seen_windows() -> frozenset[str]:
    """Windows of SHARED_RUN / 2 characters at every multiple of SHARED_RUN / 2 of GistNet's train and
    validation text (whitespace collapsed): a run of SHARED_RUN characters shared with that text
    holds one of them."""
    from gistnet.corpus import corpus_text

    seen = " ".join(corpus_text(c, s) for c in ("pydoc", "stdlib") for s in ("train", "validation"))
    seen, w = re.sub(r"\s+", " ", seen), SHARED_RUN // 2
    return frozenset(seen[i : i + w] for i in range(0, len(seen) - w + 1, w))


def shares_seen_text(paragraph: str) -> bool:
    """Whether ``paragraph`` shares SHARED_RUN characters (whitespace collapsed) with GistNet's train
    or validation text."""
    p, w, seen = re.sub(r"\s+", " ", paragraph), SHARED_RUN // 2, _seen_windows()
    return any(p[i : i + w] in seen for i in range(len(p) - w + 1))


def _source_split(source: str) -> str:
    kind, name = source.split(":", 1)
    return ("heldout" if name in pydoc_split("heldout") else "train") if kind == "pydoc" else module_split(name)


@functools.cache
def _paragraphs(source: str) -> tuple[str, ...]:
    """A filler document's paragraphs (blank-line separated); a module gives its docstrings of at
    least 200 characters (module, classes, functions, methods). A held-out document leaves out the
    paragraphs that share text with GistNet's train or validation text (``shares_seen_text``)."""
    kind, name = source.split(":", 1)
    if kind == "pydoc":
        import pydoc_data.topics as topics

        text = topics.topics[name]
    else:
        try:
            tree = ast.parse(stdlib_modules()[name].read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            return ()
        nodes = [tree, *tree.body]
        nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        defs = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(n) or "" for n in nodes if isinstance(n, defs)]
        text = "\n\n".join(d for d in docs if len(d) >= 200)
    paras = (p.rstrip() for p in re.split(r"\n\s*\n", text) if p.strip())
    paras = (p for p in paras if np.diff([0, *_sentence_starts(p), len(p)]).max() <= MAX_GAP)
    if _source_split(source) == "heldout":
        paras = (p for p in paras if not shares_seen_text(p))
    return tuple(paras)


def _sentence_starts(text: str) -> list[int]:
    """Where a sentence starts after [.!?] (and an optional closing quote or bracket)."""
    return [m.end() for m in re.finditer(r"[.!?][\"')]?[ \n]+(?=[A-Z\"(])", text)]


def approx_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: ``len(text) / CHARS_PER_TOKEN``, rounded up."""
    return int(np.ceil(len(text) / CHARS_PER_TOKEN))


def token_counter(tokenizer: Any = None) -> Callable[[str], int]:
    """``count_tokens(text)`` from a Hugging Face tokenizer, a callable, or None (``approx_tokens``)."""
    if tokenizer is None:
        return approx_tokens
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"count_tokens must be a tokenizer or a callable, got {type(tokenizer).__name__}")


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


def _filler(sources: list[str], budget: int, count: Callable[[str], int], slack: int) -> str:
    """Paragraphs of ``sources`` in order up to ``budget`` tokens; the last one is cut at a sentence
    end, or at a word end when that leaves more than ``slack`` tokens unused (a paragraph whose
    first word does not fit is passed over)."""
    paras: list[str] = []
    used = 0
    for source in sources:
        for p in _paragraphs(source):
            room = budget - used - 1  # - the paragraph break
            if count(p) > room:
                cut = _longest_prefix(p, _sentence_starts(p), room, count).rstrip()
                if room - count(cut) > slack:
                    cut = _longest_prefix(p, [m.start() for m in re.finditer(r"\s+", p)], room, count)
                if cut:
                    return "\n\n".join([*paras, cut])
                continue
            paras.append(p)
            used += count(p) + 1
            if budget - used <= slack:
                return "\n\n".join(paras)
    raise ConfigError(f"the filler text ({len(sources)} documents) holds fewer than {budget} tokens")


def _place(filler: str, needles: list[tuple[str, float]]) -> tuple[str, list[list[int]]]:
    """Insert each (needle, depth) at the sentence or paragraph start nearest fraction ``depth`` of
    the final context, in depth order (ties keep list order); returns (context, spans)."""
    starts = {0: "para", len(filler): "end"} | {m.end(): "para" for m in re.finditer("\n\n", filler)}
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
        lead, trail = ("\n\n", "") if starts[p] == "end" else ("", "\n\n" if starts[p] == "para" else " ")
        pieces += [filler[prev:p], lead + text + trail]
        n += p - prev
        spans[j] = [n + len(lead), n + len(lead) + len(text)]
        n, prev, shift = n + len(lead + text + trail), p, shift + len(text) + 2
    return "".join([*pieces, filler[prev:]]), spans


@dataclass
class TaskConfig:
    """Generate long-context tasks (pass key, multi-key needle, variable tracking) as JSONL."""

    kind: Literal["passkey", "multikey", "vt", "code"] = "passkey"
    """Task kind: 'passkey' (5 digits), 'multikey' (7-digit magic numbers, one asked), 'vt' (variable tracking), 'code' (module continuation; depths do not apply)."""
    n_tasks: int = 10
    """Number of tasks."""
    length: tuple[int, ...] = (2048,)
    """Tokens of context + question + answer: at most this, usually within 1% (so a task fits an LM with this many positions); task i takes length[i % len(length)]."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Depth of the asked needle as a fraction of the context; task i takes depths[(i // len(length)) % len(depths)]; empty = uniform per task."""
    split: Literal["train", "heldout"] = "train"
    """Filler text, modules and phrasings: 'train' or 'heldout' (disjoint)."""
    n_keys: int = 4
    """multikey: magic-number statements per task (one asked, the others distractors)."""
    n_chains: int = 2
    """vt: assignment chains per task (one asked, the others distractors)."""
    chain_length: int = 3
    """vt: variables per chain (chain_length - 1 hops)."""
    answer_tokens: int = 32
    """code: tokens of the scored continuation (whole lines, cut at a word end past this)."""
    near_chars: int = 1024
    """code: the name the continuation uses is defined, and otherwise absent, before the context's last this many characters."""
    seed: int = 0
    """Seed: task i draws from numpy.random.default_rng([seed, split, kind, i])."""
    tokenizer: str = "chars"
    """Token counter for lengths: 'chars' (~4 characters a token, no model), 'smollm2', or a tokenizer folder."""
    out: str = "tasks.jsonl"
    """Output JSONL file (command line only)."""

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ConfigError(f"kind must be one of {ALL_KINDS}, got {self.kind!r}")
        if self.answer_tokens < 1 or self.near_chars < 0:
            raise ConfigError(f"need answer_tokens >= 1 and near_chars >= 0, got {self.answer_tokens}, {self.near_chars}")
        _check_split(self.split)
        if self.n_tasks < 1 or self.seed < 0 or not self.length or min(self.length) < 64:
            raise ConfigError(f"need n_tasks >= 1, seed >= 0, lengths >= 64 tokens; got {self.n_tasks}, "
                              f"{self.seed}, {self.length}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must lie in [0, 1], got {self.depths}")
        if self.n_keys < 1 or self.n_keys > len(KEY_WORDS) or self.n_chains < 1 or self.chain_length < 2:
            raise ConfigError(f"need 1 <= n_keys <= {len(KEY_WORDS)}, n_chains >= 1, chain_length >= 2")


def _needles(c: TaskConfig, rng: np.random.Generator, depth: float
             ) -> tuple[list[tuple[str, float]], list[int], str, str, int]:
    """(needles with depths, indices of the asked ones, question, answer, template index)."""
    options = TEMPLATES[c.kind][c.split]
    t = int(rng.integers(len(options)))
    first, later, question = options[t]
    if c.kind == "passkey":
        v = str(rng.integers(10_000, 100_000))
        return [(first.format(v=v), depth)], [0], question, f" {v}", t
    if c.kind == "multikey":
        keys = [KEY_WORDS[i] for i in rng.choice(len(KEY_WORDS), c.n_keys, replace=False)]
        values = (rng.choice(9_000_000, c.n_keys, replace=False) + 1_000_000).astype(str)
        depths = [depth, *rng.uniform(0.0, 1.0, c.n_keys - 1)]  # key 0 is asked, the rest distract
        needles = [(first.format(k=k, v=v), d) for k, v, d in zip(keys, values, depths, strict=True)]
        return needles, [0], question.format(k=keys[0]), f" {values[0]}", t
    n_chains, chain_length = c.n_chains, c.chain_length
    names: list[str] = []
    while len(names) < n_chains * chain_length:  # distinct names of 4 consonants (no words)
        name = "".join(CONSONANTS[x] for x in rng.integers(0, len(CONSONANTS), 4))
        if name not in names:
            names.append(name)
    values = (rng.choice(90_000, n_chains, replace=False) + 10_000).astype(str)
    needles = []
    for i in range(n_chains):  # chain 0 is asked: it starts at the depth, its hops follow it
        chain = names[i * chain_length : (i + 1) * chain_length]
        d = np.sort(rng.uniform(depth if i == 0 else 0.0, 1.0, chain_length))
        d[0] = depth if i == 0 else d[0]
        needles.append((first.format(a=chain[0], v=values[i]), float(d[0])))
        needles += [(later.format(a=a, b=b), float(x)) for a, b, x in zip(chain, chain[1:], d[1:], strict=False)]
    return needles, list(range(chain_length)), question.format(v=values[0]), " " + " ".join(names[:chain_length]), t


def make_task(config: TaskConfig, i: int, count_tokens: Callable[[str], int], counter: str = "chars") -> dict[str, Any]:
    """Task ``i`` of ``config``; it depends only on the config and i (``counter`` names
    ``count_tokens`` in the task's meta)."""
    c = config
    rng = np.random.default_rng([c.seed, SPLITS.index(c.split), ALL_KINDS.index(c.kind), i])
    n = c.length[i % len(c.length)]
    if c.kind == "code":
        return make_code_task(c, i, n, rng, count_tokens, counter)
    depth = float(c.depths[(i // len(c.length)) % len(c.depths)] if c.depths else rng.uniform())
    needles, asked, question, answer, t = _needles(c, rng, depth)
    question = "\n\n" + question
    sources = filler_sources(c.split)
    sources = [sources[j] for j in rng.permutation(len(sources))]
    tol = max(8, n // 100)  # the whole stream lands at most n tokens: it fits an LM with n positions
    budget = n - tol // 2 - sum(count_tokens(x) + 1 for x in (question, answer, *(x for x, _ in needles)))
    best: tuple[int, str, list[list[int]]] | None = None
    for _ in range(6):  # the sum of parts misses a few tokens at joins: correct and refill
        if budget < 1:
            raise ConfigError(f"length {n} leaves no room for filler around the needles and question")
        context, spans = _place(_filler(sources, budget, count_tokens, tol // 4), needles)
        total = count_tokens(context + question) + count_tokens(answer)
        if total <= n and (best is None or total > best[0]):
            best = (total, context, spans)
        if n - tol <= total <= n:
            break
        budget += n - tol // 2 - total
    if best is None or best[0] < n - 3 * tol:
        raise ConfigError(f"could not fit task {i} into [{n - 3 * tol}, {n}] tokens (last try {total})")
    _, context, spans = best
    return {"id": f"{c.kind}-{c.split}-s{c.seed}-{i:05d}", "context": context, "question": question,
            "answer": answer, "needle_spans": [spans[j] for j in asked],
            "meta": {"kind": c.kind, "split": c.split, "length": n, "depth": depth, "template": t,
                     "tokenizer": counter, "seed": c.seed}}


# ----------------------------------------------------------------------------- code continuation
_USE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]{3,})\b(?=[ \t]*[(.\[\]),:]|[ \t]*$)", re.M)
"""A name used as code: followed by a call, attribute, index, separator or the line's end."""
_STRING_OR_COMMENT = re.compile(r"#[^\n]*|'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
_COMMON = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "cls", "args", "kwargs"}


@functools.cache
def _code_modules(split: str, min_chars: int) -> tuple[str, ...]:
    return tuple(name for name, _ in code_documents(split, min_chars))


def _definition(name: str, text: str) -> re.Match | None:
    """The first line of ``text`` that binds ``name``: def/class, assignment, import, for target."""
    n = re.escape(name)
    return re.search(rf"^[ \t]*(?:(?:async[ \t]+)?def[ \t]+{n}\b|class[ \t]+{n}\b|{n}[ \t]*(?::[^=\n]*)?=[^=]"
                     rf"|(?:from[ \t]+\S+[ \t]+)?import[ \t][^\n]*\b{n}\b|for[ \t]+{n}[ \t]+in\b).*$", text, re.M)


def make_code_task(c: TaskConfig, i: int, n: int, rng: np.random.Generator, count_tokens: Callable[[str], int],
                   counter: str) -> dict[str, Any]:
    """A code-continuation task: ``context`` = the lines of a module of the split before a cut (at
    most ``n`` tokens with the answer), ``question`` = '' and ``answer`` = the next lines (about
    ``answer_tokens`` tokens). The cut is drawn until the answer uses a name (4+ characters, not a
    keyword or builtin) that the context binds (def, class, assignment, import, for) before its last
    ``near_chars`` characters and never mentions within them: a recency window of that size cannot
    see where the name comes from. The needle span is that binding line; depth is its position."""
    modules = _code_modules(c.split, 3 * n)
    if not modules:
        raise ConfigError(f"no {c.split} standard-library module holds {3 * n} characters")
    order = rng.permutation(len(modules))
    for m in order:  # the task's own module first; the others only if it has no cut
        name = modules[m]
        text = stdlib_modules()[name].read_text(encoding="utf-8", errors="replace")
        lines = np.array([0, *(x.end() for x in re.finditer("\n", text))])
        for cut in rng.choice(lines[1:-1], size=min(64, len(lines) - 2), replace=False):
            cut = int(cut)
            ends = [x.end() for x in re.finditer("\n", text[cut:])]
            answer, n_answer = "", 0
            for e in ends[:40]:  # whole lines until answer_tokens
                answer = text[cut : cut + e]
                n_answer = count_tokens(answer)
                if n_answer >= c.answer_tokens:
                    break
            if n_answer > 2 * c.answer_tokens:
                answer = _longest_prefix(answer, [x.start() for x in re.finditer(r"\s+", answer)],
                                         c.answer_tokens, count_tokens)
                n_answer = count_tokens(answer)
            if not c.answer_tokens // 2 <= n_answer < n // 4:
                continue
            budget = n - n_answer - max(2, n // 200)
            starts = lines[lines < cut]
            lo, hi = 0, len(starts) - 1  # the earliest line start whose context fits the budget
            while lo < hi:
                mid = (lo + hi) // 2
                if count_tokens(text[starts[mid] : cut]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            context = text[starts[lo] : cut]
            n_context = count_tokens(context)
            if n_context > budget or n_context + n_answer < n - max(24, 3 * n // 100):
                continue
            split_at = max(0, len(context) - c.near_chars)  # a context shorter than near_chars has no far part
            far, near = context[:split_at], context[split_at:]
            for word in dict.fromkeys(_USE.findall(_STRING_OR_COMMENT.sub(" ", answer))):
                if word in _COMMON or re.search(rf"\b{re.escape(word)}\b", near) or _definition(word, answer):
                    continue  # common, seen near the cut, or bound by the answer itself
                found = _definition(word, far)
                if found is None:
                    continue
                span = [found.start(), found.end()]
                return {"id": f"code-{c.split}-s{c.seed}-{i:05d}", "context": context, "question": "",
                        "answer": answer, "needle_spans": [span],
                        "meta": {"kind": "code", "split": c.split, "length": n,
                                 "depth": round(span[0] / len(context), 2), "module": name, "name": word,
                                 "cut_char": cut, "tokenizer": counter, "seed": c.seed}}
    raise ConfigError(f"no cut with a far-defined name in the {c.split} modules for task {i} (length {n})")


def generate_tasks(config: TaskConfig, count_tokens: Any = None) -> list[dict[str, Any]]:
    """``config.n_tasks`` tasks; ``count_tokens`` (a tokenizer or callable) overrides ``config.tokenizer``."""
    name = config.tokenizer if count_tokens is None else getattr(count_tokens, "name_or_path", "custom")
    if count_tokens is None and name != "chars":
        from transformers import AutoTokenizer

        from sim.lm import DEFAULT_LM, smollm2_folder

        count_tokens = AutoTokenizer.from_pretrained(smollm2_folder() if name == DEFAULT_LM else name)
    count = token_counter(count_tokens)
    return [make_task(config, i, count, name) for i in range(config.n_tasks)]


# ----------------------------------------------------------------------------- task files
def write_jsonl(tasks: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write one task per line (UTF-8), via a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _problem(task: Any, seen: dict[str, int], max_chars: int | None) -> str | None:
    """What is wrong with one decoded line (``seen``: id -> line of the ids so far), or None."""
    if not isinstance(task, dict):
        return f"expected a JSON object, got {type(task).__name__}"
    for key in ("id", "context", "question", "answer"):
        if not isinstance(task.get(key), str):
            return f"missing field {key!r}" if key not in task else f"field {key!r} is not a string"
    if not task["id"] or task["id"] in seen:
        return f"duplicate id {task['id']!r} (first on line {seen[task['id']]})" if task["id"] else "empty id"
    if not task["answer"].strip():
        return "empty answer"
    n = len(task["context"])
    if max_chars is not None and n + len(task["question"]) > max_chars:
        return f"context + question hold {n + len(task['question'])} characters > max_chars={max_chars}"
    spans = task.get("needle_spans", [])
    if not isinstance(spans, list):
        return "field 'needle_spans' is not a list"
    for s in spans:
        if not (isinstance(s, list) and len(s) == 2 and all(type(x) is int for x in s)):
            return f"needle span {s!r} is not a [start, end] pair of integers"
        if not 0 <= s[0] < s[1] <= n:
            return f"needle span {s} is empty or outside the context [0, {n}]"
    return None


def scan_tasks(path: str | os.PathLike, max_chars: int | None = None, lines: dict[str, int] | None = None
               ) -> tuple[list[dict[str, Any]], list[TaskFileError]]:
    """(valid tasks, one ``TaskFileError`` per bad line), so an evaluator can skip bad lines. Blank
    lines are skipped; a missing ``needle_spans`` reads as []; ``max_chars`` caps context + question.
    ``lines``, when given, receives id -> line number of every valid task (for later messages)."""
    tasks: list[dict[str, Any]] = []
    errors: list[TaskFileError] = []
    seen: dict[str, int] = {} if lines is None else lines
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                task = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except UnicodeDecodeError as err:
                errors.append(TaskFileError(path, line_no, f"not UTF-8 ({err.reason} at byte {err.start})"))
                continue
            except json.JSONDecodeError as err:
                errors.append(TaskFileError(path, line_no, f"bad JSON: {err.msg} at column {err.colno}"))
                continue
            problem = None if task is None else _problem(task, seen, max_chars)
            if problem is not None:
                errors.append(TaskFileError(path, line_no, problem))
            elif task is not None:
                seen[task["id"]] = line_no
                tasks.append({**task, "needle_spans": task.get("needle_spans", [])})
    return tasks, errors


def read_tasks(path: str | os.PathLike, max_chars: int | None = None) -> list[dict[str, Any]]:
    """Every task of a JSONL task file (``max_chars`` caps context + question); raises the first bad
    line's ``TaskFileError`` (line 0: the file holds no task)."""
    tasks, errors = scan_tasks(path, max_chars)
    if errors or not tasks:
        raise errors[0] if errors else TaskFileError(path, 0, "no tasks in the file")
    return tasks


def main(argv: list[str] | None = None) -> None:
    from sim.cli import parse

    config = parse(TaskConfig, argv)
    try:
        tasks = generate_tasks(config)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    write_jsonl(tasks, config.out)
    print(f"wrote {len(tasks)} {config.kind} tasks ({config.split}) to {config.out}")


if __name__ == "__main__":
    main()
