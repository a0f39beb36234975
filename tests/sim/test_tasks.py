"""Long-context task generators: recoverable answers, needle depth, lengths, determinism, disjoint
train / held-out text and phrasing, held-out text that GistNet never trains on, the task-file
reader's errors, the module split, the CLI, the kind registry as the one place a kind is added."""

import json
import pydoc_data.topics
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gistnet.corpus import corpus_text, pydoc_split, stdlib_modules, stdlib_split_of
from megacontext.tree import ConfigError
from sim.tasks import (
    FAMILIES,
    KEY_WORDS,
    KINDS,
    MAX_GAP,
    TEMPLATES,
    TaskConfig,
    TaskFileError,
    approx_tokens,
    code_documents,
    filler_sources,
    generate_tasks,
    main,
    module_split,
    read_tasks,
    scan_tasks,
    write_jsonl,
)
from sim.tasks.filler import _paragraphs
from sim.tasks.kinds import TASK_KINDS, NeedleKind

TEMPLATE_KINDS = tuple(TEMPLATES)
"""The needle kinds phrased by fixed templates (the niah-* families: tests/sim/test_families.py)."""


def words(text: str) -> int:
    """A token counter unlike the default one (whitespace words), to show lengths follow it."""
    return len(text.split())


def one_task(
    kind: str, seed: int, depth: float, length: int, split: str = "train", count=None
) -> dict:
    return generate_tasks(
        TaskConfig(kind=kind, n_tasks=1, length=(length,), depths=(depth,), split=split, seed=seed),
        count,
    )[0]


def needle_pattern(task: dict) -> re.Pattern:
    """Any needle of the task's template (the asked one, distractors, vt hops)."""
    first, hop, _ = TEMPLATES[task["meta"]["kind"]][task["meta"]["split"]][task["meta"]["template"]]
    subs = {r"\{v\}": r"\d+", r"\{k\}": r"\w+", r"\{a\}": r"[A-Z]+", r"\{b\}": r"[A-Z]+"}
    patterns = []
    for template in filter(None, (first, hop)):
        p = re.escape(template)
        for placeholder, sub in subs.items():
            p = p.replace(placeholder, sub)
        patterns.append(p)
    return re.compile("|".join(patterns))


def filler_of(task: dict) -> str:
    """The context with every needle cut out."""
    return needle_pattern(task).sub("", task["context"])


@given(
    kind=st.sampled_from(TEMPLATE_KINDS),
    seed=st.integers(0, 2**32 - 1),
    depth=st.floats(0.0, 1.0),
    length=st.sampled_from([1024, 2048]),
    split=st.sampled_from(["train", "heldout"]),
)
def test_answer_lies_in_the_needles_at_the_claimed_depth(kind, seed, depth, length, split):
    task = one_task(kind, seed, depth, length, split)
    context, answer, spans = task["context"], task["answer"], task["needle_spans"]
    assert (
        answer.startswith(" ")
        and answer == " " + answer.strip()
        and not task["question"].endswith(" ")
    )
    assert spans and all(0 <= a < b <= len(context) for a, b in spans)
    needles = [context[a:b] for a, b in spans]
    if kind == "vt":  # the chain: value then each hop, each span naming the variables in order
        names = answer.split()
        assert len(needles) == len(names) == 3
        value = re.search(r"\d+", task["question"]).group()
        assert value in needles[0] and names[0] in needles[0]
        for prev, name, needle in zip(names[:-1], names[1:], needles[1:], strict=True):
            assert prev in needle and name in needle and value not in needle
        assert [a for a, _ in spans] == sorted(a for a, _ in spans)
    else:
        assert len(needles) == 1 and answer.strip() in needles[0]
    if kind == "multikey":  # n_keys statements; the asked key is in the question and in one of them
        statements = needle_pattern(task).findall(context)
        assert len(statements) == 4 and statements.count(needles[0]) == 1
        key = next(w for w in re.findall(r"\w+", needles[0]) if w in KEY_WORDS)
        assert key in task["question"] and [s for s in statements if key in s] == [needles[0]]
        assert sum(answer.strip() in s for s in statements) == 1
    # depth: the asked needle starts within half the largest sentence gap of d * len(context)
    assert abs(spans[0][0] - depth * len(context)) <= MAX_GAP / 2 + 0.01 * len(context)
    n_tokens = approx_tokens(context + task["question"]) + approx_tokens(answer)
    assert 0.97 * length <= n_tokens <= length


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_follow_the_given_token_counter(kind):
    for length in (1024, 3000):
        task = one_task(kind, 7, 0.5, length, count=words)
        n_words = words(task["context"] + task["question"]) + words(task["answer"])
        assert 0.97 * length <= n_words <= length
        assert abs(approx_tokens(task["context"]) - length) > 0.1 * length  # a different measure


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS))
def test_same_seed_same_file(tmp_path_factory, seed, kind):
    config = TaskConfig(kind=kind, n_tasks=3, length=(1024,), depths=(), seed=seed)
    a, b = tmp_path_factory.mktemp("a") / "t.jsonl", tmp_path_factory.mktemp("b") / "t.jsonl"
    write_jsonl(generate_tasks(config), a)
    write_jsonl(generate_tasks(config), b)
    assert a.read_bytes() == b.read_bytes()
    other = generate_tasks(
        TaskConfig(kind=kind, n_tasks=3, length=(1024,), depths=(), seed=seed + 1)
    )
    assert [t["context"] for t in other] != [t["context"] for t in read_tasks(a)]
    assert read_tasks(a) == generate_tasks(config)  # the file round-trips


def test_depth_and_length_grid():
    tasks = generate_tasks(
        TaskConfig(kind="passkey", n_tasks=6, length=(1024, 2048), depths=(0.0, 0.5, 1.0))
    )
    assert [(t["meta"]["length"], t["meta"]["depth"]) for t in tasks] == [
        (1024, 0.0),
        (2048, 0.0),
        (1024, 0.5),
        (2048, 0.5),
        (1024, 1.0),
        (2048, 1.0),
    ]
    assert len({t["id"] for t in tasks}) == 6


def ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    out = set()
    for piece in re.split(r"\{[a-z]\}", text):  # placeholders break the phrase
        w = piece.lower().translate(str.maketrans("", "", string.punctuation)).split()
        out |= {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    return out


@pytest.mark.parametrize("kind", TEMPLATE_KINDS)
def test_train_and_heldout_phrasings_are_disjoint(kind):
    grams = {
        s: set().union(*(ngrams(x) for t in TEMPLATES[kind][s] for x in t))
        for s in ("train", "heldout")
    }
    assert grams["train"] and grams["heldout"] and not grams["train"] & grams["heldout"]
    heldout = generate_tasks(
        TaskConfig(kind=kind, n_tasks=8, length=(1024,), split="heldout", seed=3)
    )
    for task in heldout:  # no train phrase in a held-out needle or question
        text = " ".join(task["context"][a:b] for a, b in task["needle_spans"]) + task["question"]
        assert not ngrams(text) & grams["train"]
    assert len({t["meta"]["template"] for t in heldout}) == len(TEMPLATES[kind]["heldout"])


def test_train_and_heldout_filler_share_no_200_characters():
    train = set(filler_sources("train"))
    assert train.isdisjoint(filler_sources("heldout"))
    kw = dict(n_tasks=4, length=(4096,), depths=(0.5,), seed=11)
    train_text = "\n".join(
        filler_of(t) for k in TEMPLATE_KINDS for t in generate_tasks(TaskConfig(kind=k, **kw))
    )
    held_text = "\n".join(
        filler_of(t)
        for k in TEMPLATE_KINDS
        for t in generate_tasks(TaskConfig(kind=k, split="heldout", **kw))
    )
    assert len(train_text) > 150_000 and len(held_text) > 150_000
    # any common substring of 200 characters holds a train window of 100 starting at a multiple
    # of 100
    windows = {train_text[i : i + 100] for i in range(0, len(train_text) - 99, 100)}
    shared = [i for i in range(len(held_text) - 99) if held_text[i : i + 100] in windows]
    assert not shared, held_text[shared[0] : shared[0] + 200]
    # the check can fail: the same split does share text across tasks
    again = "\n".join(
        filler_of(t) for t in generate_tasks(TaskConfig(kind="passkey", **{**kw, "seed": 12}))
    )
    assert any(again[i : i + 100] in windows for i in range(len(again) - 99))


def test_module_split_is_disjoint_and_keeps_packages_whole():
    docs = {s: dict(code_documents(s, min_chars=2000)) for s in ("train", "heldout")}
    assert docs["train"] and docs["heldout"] and docs["train"].keys().isdisjoint(docs["heldout"])
    assert all(len(text) >= 2000 for d in docs.values() for text in d.values())
    assert 0.03 < len(docs["heldout"]) / (len(docs["train"]) + len(docs["heldout"])) < 0.25
    for split, d in docs.items():  # a package stays on one side
        assert all(module_split(name.split(".")[0]) == split for name in d)
    assert module_split("_pyio") == module_split("io")
    assert module_split("_pydecimal") == module_split("decimal")


def test_heldout_tasks_read_only_text_gistnet_never_trains_on():
    """The task split is GistNet's: every held-out filler source and code module lies in GistNet's
    held-out split, every training one in its train split, and no held-out filler paragraph shares
    200 characters with GistNet's train or validation text (a pure-Python twin such as ``_py_abc``
    repeats its public twin's docstrings: it must serve neither side)."""
    for split, gist_split in (("heldout", "heldout"), ("train", "train"), ("dev", "validation")):
        kinds = {s.split(":", 1)[0] for s in filler_sources(split)}
        assert kinds == {"pydoc", "module"}
        topics = [s.split(":", 1)[1] for s in filler_sources(split) if s.startswith("pydoc:")]
        assert set(topics) == set(pydoc_split(gist_split))
        modules = [s.split(":", 1)[1] for s in filler_sources(split) if s.startswith("module:")]
        modules += [name for name, _ in code_documents(split, 0)]
        assert modules and {stdlib_split_of(m) for m in modules} == {gist_split}, split
    seen = " ".join(corpus_text(c, s) for c in ("pydoc", "stdlib") for s in ("train", "validation"))
    seen = re.sub(r"\s+", " ", seen)  # docstrings stand indented in the source, dedented as filler
    windows = {seen[i : i + 100] for i in range(0, len(seen) - 99, 100)}
    paragraphs = [
        re.sub(r"\s+", " ", p) for source in filler_sources("heldout") for p in _paragraphs(source)
    ]
    assert len(paragraphs) > 300
    # any common run of 200 characters holds a window of 100 that starts at a multiple of 100
    shared = [p for p in paragraphs if any(p[i : i + 100] in windows for i in range(len(p) - 99))]
    assert not shared, shared[0][:200]
    # the check can fail: a held-out pydoc topic repeats paragraphs of training topics, and _py_abc
    # (GistNet's held-out split) repeats abc's (its train split)
    raw = [re.sub(r"\s+", " ", p) for p in re.split(r"\n\s*\n", pydoc_data.topics.topics["class"])]
    assert "class" in pydoc_split("heldout")
    assert any(p[i : i + 100] in windows for p in raw for i in range(len(p) - 99))
    twin = re.sub(r"\s+", " ", stdlib_modules()["_py_abc"].read_text())
    assert stdlib_split_of("_py_abc") == "heldout" and module_split("_py_abc") == "none"
    assert any(twin[i : i + 100] in windows for i in range(len(twin) - 99))


def test_code_task_far_part_never_wraps_around():
    """A context shorter than near_chars (~2 000 characters against 3 000) has no far part: no name
    is bound far enough above, so there is no task (a negative slice would wrap around and call
    the context's first ~1 000 characters 'far')."""
    with pytest.raises(ConfigError, match="no cut with a far-defined name"):
        generate_tasks(
            TaskConfig(kind="code", n_tasks=1, length=(512,), split="heldout", near_chars=3000)
        )


BAD_LINES = {
    "{not json": "bad JSON",
    "[1, 2]": "expected a JSON object",
    '{"id": "x", "context": "abc", "question": "q"}': "missing field 'answer'",
    '{"id": "x", "context": "abc", "question": "q", "answer": 5}': "'answer' is not a string",
    '{"id": "x", "context": "abc", "question": "q", "answer": "  "}': "empty answer",
    '{"id": "x", "context": "abc", "question": "q", "answer": " 1", '
    '"needle_spans": [[2, 9]]}': "outside",
    '{"id": "x", "context": "abc", "question": "q", "answer": " 1", '
    '"needle_spans": [[2, 2]]}': "empty",
    '{"id": "x", "context": "abc", "question": "q", "answer": " 1", '
    '"needle_spans": [[1.5, 2]]}': "pair of integers",
    '{"id": "x", "context": "abc", "question": "q", "answer": " 1", '
    '"needle_spans": 3}': "not a list",
    '{"id": "a", "context": "abc", "question": "q", "answer": " 1"}': (
        "duplicate id 'a' (first on line 1)"
    ),
}


@pytest.mark.parametrize("bad, problem", BAD_LINES.items())
def test_reader_errors_name_file_and_line(tmp_path, bad, problem):
    good = [
        {
            "id": "a",
            "context": "abcdef",
            "question": " q",
            "answer": " 1",
            "needle_spans": [[0, 3]],
        },
        {"id": "b", "context": "xyz", "question": " q", "answer": " 2"},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(good[0]) + "\n\n" + bad + "\n" + json.dumps(good[1]) + "\n")
    match = rf"tasks\.jsonl: line 3: .*{re.escape(problem)}"
    with pytest.raises(TaskFileError, match=match) as err:
        read_tasks(path)
    assert err.value.line == 3
    lines: dict[str, int] = {}
    # the evaluator's way: skip the bad line, keep the others
    tasks, errors = scan_tasks(path, lines=lines)
    assert [t["id"] for t in tasks] == ["a", "b"] and [e.line for e in errors] == [3]
    assert lines == {"a": 1, "b": 4}
    assert tasks[1]["needle_spans"] == []


def test_reader_limits_and_empty_files(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(generate_tasks(TaskConfig(n_tasks=2, length=(512,))), path)
    assert len(read_tasks(path, max_chars=10_000)) == 2
    with pytest.raises(TaskFileError, match="line 1: .*max_chars=100"):
        read_tasks(path, max_chars=100)
    path.write_bytes(b"\n")
    with pytest.raises(TaskFileError, match="no tasks"):
        read_tasks(path)
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(TaskFileError, match="line 1: not UTF-8"):
        read_tasks(path)


@pytest.mark.parametrize(
    "bad",
    [
        dict(depths=(1.5,)),
        dict(split="test"),
        dict(kind="nope"),
        dict(length=(10,)),
        dict(n_keys=0),
        dict(chain_length=1),
        dict(seed=-1),
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        TaskConfig(**bad)


def test_an_unknown_kind_is_refused_naming_the_choices(capsys):
    with pytest.raises(ConfigError, match="kind must be one of") as err:
        TaskConfig(kind="nope")
    assert "'nope'" in str(err.value) and all(repr(k) in str(err.value) for k in TASK_KINDS)
    assert (
        tuple(TASK_KINDS)[:4] == (*TEMPLATE_KINDS, "code") == ("passkey", "multikey", "vt", "code")
    )
    assert set(TASK_KINDS) == {*KINDS, "code"} and set(KINDS) - set(TEMPLATE_KINDS) == set(FAMILIES)
    with pytest.raises(SystemExit) as exit_info:  # the command line lists the kinds too
        main(["--kind", "nope"])
    assert exit_info.value.code == 2  # argparse: a usage error
    usage = capsys.readouterr().err
    assert "invalid choice: 'nope'" in usage and all(repr(k) in usage for k in TASK_KINDS)


class Colour(NeedleKind):
    """A tiny needle kind that only the test below registers: a colour word, asked back."""

    name = "colour"
    templates = {
        "train": (
            ("The colour of the day is {v}.", "", "Which colour is the colour of the day? It is"),
        ),
        "heldout": (
            ("Today's hue reads {v}.", "", "Name the hue that today's reading gave. It reads"),
        ),
    }

    def needles(self, c, rng, template, depth):
        first, _, question = template
        v = ("crimson", "teal", "amber")[int(rng.integers(3))]
        return [(first.format(v=v), depth)], [0], question, f" {v}"


def test_a_kind_is_added_in_the_registry_alone(monkeypatch, tmp_path, capsys):
    """Registering a kind, and nothing else, makes the config, the generator and the command line
    take it, with its own phrasings per split; the kinds registered before it draw the same tasks
    as without it."""
    passkey = generate_tasks(TaskConfig(n_tasks=2, length=(512,)))
    with pytest.raises(ConfigError, match="kind must be one of"):
        TaskConfig(kind="colour")
    monkeypatch.setitem(TASK_KINDS, "colour", Colour())
    for split in ("train", "heldout"):
        config = TaskConfig(kind="colour", split=split, n_tasks=3, length=(1024,), depths=(0.5,))
        first, _, question = Colour.templates[split][0]
        for task in generate_tasks(config):
            ((a, b),) = task["needle_spans"]
            context, answer = task["context"], task["answer"]
            assert task["meta"]["kind"] == "colour" and task["id"].startswith(f"colour-{split}-")
            assert context[a:b] == first.format(v=answer.strip())
            assert task["question"] == "\n\n" + question
            assert abs(a - 0.5 * len(context)) <= MAX_GAP / 2 + 0.01 * len(context)
            n_tokens = approx_tokens(context + task["question"]) + approx_tokens(answer)
            assert 0.97 * 1024 <= n_tokens <= 1024
    assert generate_tasks(TaskConfig(n_tasks=2, length=(512,))) == passkey
    out = tmp_path / "colour.jsonl"
    main(["--kind", "colour", "--n-tasks", "2", "--length", "512", "--out", str(out)])
    assert [t["meta"]["kind"] for t in read_tasks(out)] == ["colour"] * 2
    assert "wrote 2 colour tasks" in capsys.readouterr().out


def test_cli_writes_a_readable_task_file(tmp_path, capsys):
    out = tmp_path / "sub" / "tasks.jsonl"
    main(
        [
            "--kind",
            "vt",
            "--n-tasks",
            "3",
            "--length",
            "1024",
            "--split",
            "heldout",
            "--out",
            str(out),
        ]
    )
    tasks = read_tasks(out)
    assert [t["meta"]["split"] for t in tasks] == ["heldout"] * 3
    assert "wrote 3 vt tasks" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--kind", "passkey", "--depths", "2.0", "--out", str(out)])
    assert exit_info.value.code == 2  # refused by TaskConfig: a usage error naming the field
    assert "depths must lie in [0, 1]" in capsys.readouterr().err


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.sampled_from([1024, 2048]),
    split=st.sampled_from(["train", "heldout"]),
)
def test_code_task_uses_a_name_bound_far_above(seed, length, split):
    """The continuation is the module's next lines; it uses a name that the needle line binds
    before the context's last near_chars characters, and that nowhere appears within them."""
    config = TaskConfig(kind="code", n_tasks=1, length=(length,), split=split, seed=seed)
    task = generate_tasks(config)[0]
    meta = task["meta"]
    source = code_documents_by_name(split)[meta["module"]]
    assert task["question"] == ""
    start, end = meta["cut_char"] - len(task["context"]), meta["cut_char"] + len(task["answer"])
    assert source[start:end] == task["context"] + task["answer"]
    assert module_split(meta["module"]) == split
    ((s, e),) = task["needle_spans"]
    name, near = meta["name"], task["context"][-config.near_chars :]
    assert re.search(rf"\b{name}\b", task["context"][s:e])
    assert e <= len(task["context"]) - config.near_chars + len(name)
    assert re.search(rf"\b{name}\b", task["answer"]) and not re.search(rf"\b{name}\b", near)
    n_tokens = approx_tokens(task["context"]) + approx_tokens(task["answer"])
    assert length - max(24, 3 * length // 100) <= n_tokens <= length
    assert meta["depth"] == round(s / len(task["context"]), 2)


def code_documents_by_name(split: str) -> dict[str, str]:
    return dict(code_documents(split, 4096))


def test_code_tasks_are_deterministic_and_spread_over_modules():
    config = TaskConfig(kind="code", n_tasks=6, length=(1024,), split="heldout", seed=3)
    a, b = generate_tasks(config), generate_tasks(config)
    assert a == b
    assert len({t["meta"]["module"] for t in a}) >= 3
