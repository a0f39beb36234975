"""The code-continuation task kind: the context is the lines of a standard-library module of the
split before a cut, the answer the next lines, and the cut is drawn until the answer uses a name
that the context binds far above the cut and never mentions near it (long-range real text).
"""

from __future__ import annotations

import builtins
import functools
import keyword
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gistnet.corpus import stdlib_modules
from megacontext.tree import ConfigError
from sim.tasks.filler import _longest_prefix, code_documents
from sim.tasks.needles import TaskDraw

if TYPE_CHECKING:
    from sim.tasks import TaskConfig

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
    return re.search(
        rf"^[ \t]*(?:(?:async[ \t]+)?def[ \t]+{n}\b|class[ \t]+{n}\b"
        rf"|{n}[ \t]*(?::[^=\n]*)?=[^=]"
        rf"|(?:from[ \t]+\S+[ \t]+)?import[ \t][^\n]*\b{n}\b"
        rf"|for[ \t]+{n}[ \t]+in\b).*$",
        text,
        re.M,
    )


def make_code_task(
    c: TaskConfig,
    i: int,
    n: int,
    rng: np.random.Generator,
    count_tokens: Callable[[str], int],
    counter: str,
) -> dict[str, Any]:
    """A code-continuation task: ``context`` = the lines of a module of the split before a cut (at
    most ``n`` tokens with the answer), ``question`` = '' and ``answer`` = the next lines (about
    ``answer_tokens`` tokens). The cut is drawn until the answer uses a name (4+ characters, not a
    keyword or builtin) that the context binds (def, class, assignment, import, for) before its last
    ``near_chars`` characters and never mentions within them: a recency window of that size cannot
    see where the name comes from. The needle span is that binding line; depth is its position.
    Long by design: its draws from ``rng`` come in one fixed order that every drawn task file
    depends on (the studies' TASKS.json hashes)."""
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
                answer = _longest_prefix(
                    answer,
                    [x.start() for x in re.finditer(r"\s+", answer)],
                    c.answer_tokens,
                    count_tokens,
                )
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
            # a context shorter than near_chars has no far part
            split_at = max(0, len(context) - c.near_chars)
            far, near = context[:split_at], context[split_at:]
            for word in dict.fromkeys(_USE.findall(_STRING_OR_COMMENT.sub(" ", answer))):
                if (
                    word in _COMMON
                    or re.search(rf"\b{re.escape(word)}\b", near)
                    or _definition(word, answer)
                ):
                    continue  # common, seen near the cut, or bound by the answer itself
                found = _definition(word, far)
                if found is None:
                    continue
                span = [found.start(), found.end()]
                return {
                    "id": f"{c.kind}-{c.split}-s{c.seed}-{i:05d}",
                    "context": context,
                    "question": "",
                    "answer": answer,
                    "needle_spans": [span],
                    "meta": {
                        "kind": c.kind,
                        "split": c.split,
                        "length": n,
                        "depth": round(span[0] / len(context), 2),
                        "module": name,
                        "name": word,
                        "cut_char": cut,
                        "tokenizer": counter,
                        "seed": c.seed,
                    },
                }
    raise ConfigError(
        f"no cut with a far-defined name in the {c.split} modules for task {i} (length {n})"
    )


class CodeContinuation:
    """'code': continuation of a standard-library module where the next lines use a name defined
    far above (``make_code_task``; depths do not apply)."""

    name = "code"
    splits = ("train", "dev", "heldout")

    def make_task(self, d: TaskDraw) -> dict[str, Any]:
        """The task ``d`` describes (``make_code_task``)."""
        return make_code_task(*d)
