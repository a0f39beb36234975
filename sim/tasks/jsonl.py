"""Task files: one task a JSON line (UTF-8), written atomically and read back with every bad line
named by file and line (``TaskFileError``), so an evaluator can skip bad lines or stop at the
first one; and the guard that keeps a sealed test split (``sim.tasks.sealed``) out of every command
that trains, calibrates or selects (``refuse_sealed``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from megacontext.tree import ConfigError

SEALED_MANIFEST = "SEALED.json"
"""The file ``sim.tasks.sealed`` writes beside a sealed split's task files."""


class TaskFileError(ValueError):
    """A task file line that is not a valid task; the message names the file and line."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}: line {line}: {problem}")


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
    if not task["id"]:
        return "empty id"
    if task["id"] in seen:
        return f"duplicate id {task['id']!r} (first on line {seen[task['id']]})"
    if not task["answer"].strip():
        return "empty answer"
    n = len(task["context"])
    if max_chars is not None and n + len(task["question"]) > max_chars:
        return (
            f"context + question hold {n + len(task['question'])} characters"
            f" > max_chars={max_chars}"
        )
    spans = task.get("needle_spans", [])
    if not isinstance(spans, list):
        return "field 'needle_spans' is not a list"
    for s in spans:
        if not (isinstance(s, list) and len(s) == 2 and all(type(x) is int for x in s)):
            return f"needle span {s!r} is not a [start, end] pair of integers"
        if not 0 <= s[0] < s[1] <= n:
            return f"needle span {s} is empty or outside the context [0, {n}]"
    return None


def scan_tasks(
    path: str | os.PathLike, max_chars: int | None = None, lines: dict[str, int] | None = None
) -> tuple[list[dict[str, Any]], list[TaskFileError]]:
    """(valid tasks, one ``TaskFileError`` per bad line), so an evaluator can skip bad lines.
    Blank lines are skipped; a missing ``needle_spans`` reads as []; ``max_chars`` caps context +
    question. ``lines``, when given, receives id -> line number of every valid task (for later
    messages)."""
    tasks: list[dict[str, Any]] = []
    errors: list[TaskFileError] = []
    seen: dict[str, int] = {} if lines is None else lines
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                task = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except UnicodeDecodeError as err:
                msg = f"not UTF-8 ({err.reason} at byte {err.start})"
                errors.append(TaskFileError(path, line_no, msg))
                continue
            except json.JSONDecodeError as err:
                msg = f"bad JSON: {err.msg} at column {err.colno}"
                errors.append(TaskFileError(path, line_no, msg))
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


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether a task file belongs to a sealed test split: a ``SEALED.json`` in its folder, or any
    line whose ``meta.sealed`` is true (so a copy or a slice of a sealed file stays sealed). A
    missing file is not sealed (its reader names it); a line that is not JSON is the reader's
    error, not this guard's."""
    path = Path(path)
    if (path.parent / SEALED_MANIFEST).exists():
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        for raw in f:
            if b'"sealed"' not in raw:  # most lines: no JSON decode
                continue
            try:
                task = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            meta = task.get("meta") if isinstance(task, dict) else None
            if isinstance(meta, dict) and meta.get("sealed") is True:
                return True
    return False


def refuse_sealed(path: str | os.PathLike, command: str) -> None:
    """Raise ``ConfigError`` when ``path`` is a sealed test-split file (``is_sealed``): ``command``
    trains, calibrates or selects, and the sealed split is evaluated once, by ``sim.evaluate
    --open-sealed`` in the committed script, never read before."""
    if is_sealed(path):
        raise ConfigError(
            f"{path} is a sealed test-split file (meta.sealed); {command} trains/calibrates/"
            f"selects and may not read it; use a dev file"
        )


def file_sha256(path: str | Path) -> str:
    """The sha256 of a task file's bytes: what SEALED.json records per cell and what a resumed
    ``sim.evaluate`` run checks its task file against."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
