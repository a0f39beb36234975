"""The needle task families (``sim.tasks.families``): no factor value in two splits (pools, and the
rendered needles and questions), dev filler that shares no text with GistNet's training text, the
RULER variants' answers, decoys without values, enough phrasings per split, loud config errors."""

import re
import string
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gistnet.corpus import corpus_text
from megacontext.tree import ConfigError
from sim.tasks import (
    FAMILIES,
    KEY_WORDS,
    MAX_GAP,
    TaskConfig,
    approx_tokens,
    filler_sources,
    generate_tasks,
)
from sim.tasks.families import (
    ASKS,
    DECOYS,
    FACTORS,
    FAMILY_SPLITS,
    KEYS,
    LEADS,
    NOUNS,
    STATEMENTS,
    VALUE_TYPES,
    WORDS,
    draw_value,
    echo_lead,
    subject_first,
)
from sim.tasks.filler import _paragraphs

FRAMES = ("statements", "asks", "leads", "decoys")
VOCABULARY = ("nouns", "keys", "words")


def grams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """Word n-grams of a frame's fixed wording (placeholders break a phrase)."""
    out = set()
    for piece in re.split(r"\{[a-zA-Z]+\}", text):
        w = piece.lower().translate(str.maketrans("", "", string.punctuation)).split()
        out |= {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    return out


def task(kind: str, split: str, seed: int, **kw) -> dict:
    config = TaskConfig(kind=kind, split=split, n_tasks=1, length=(1024,), seed=seed, **kw)
    return generate_tasks(config)[0]


def test_no_factor_value_is_shared_across_splits():
    for name, pools in FACTORS.items():
        assert set(pools) == set(FAMILY_SPLITS), name
        for a, b in combinations(FAMILY_SPLITS, 2):  # 'word' values: the disjoint WORDS lists
            assert not (set(pools[a]) & set(pools[b])) - {"word"}, (name, a, b)
    for a, b in combinations(FAMILY_SPLITS, 2):  # no wording: three words in a row, a word
        for frame in FRAMES:
            ga = set().union(*map(grams, FACTORS[frame][a]))
            gb = set().union(*map(grams, FACTORS[frame][b]))
            assert not ga & gb, (frame, a, b, ga & gb)
        shared = shared_words({s: [w for f in VOCABULARY for w in FACTORS[f][s]] for s in (a, b)})
        assert not shared, (a, b, shared)
    # keys and word values never collide, in any split (a value must not name a key)
    every = [w for f in ("keys", "words") for s in FAMILY_SPLITS for w in FACTORS[f][s]]
    assert len(every) == len(set(every))
    # the check can fail: the template kinds' nouns share their head words across splits
    assert shared_words({"train": ["pass key", "secret number"],
                         "heldout": ["secret access code", "hidden PIN"]}) == {"secret"}


def shared_words(pools: dict[str, list[str]]) -> set[str]:
    """The lower-cased words that more than one pool's phrases use."""
    words = [{w.lower() for phrase in pool for w in phrase.split()} for pool in pools.values()]
    return set().union(*(a & b for a, b in combinations(words, 2)))


def test_no_key_or_word_value_occurs_in_its_splits_filler():
    """A value or key that the filler also uses would put the answer (or the asked key) in the
    haystack too: every key and word value of a split is absent from that split's filler text."""
    for split in FAMILY_SPLITS:
        text = " ".join(p for s in filler_sources(split) for p in _paragraphs(s)).lower()
        words = set(re.findall(r"[a-z]+", text))
        hits = [w for w in (*KEYS[split], *WORDS[split]) if w.lower() in words]
        assert not hits, (split, hits)
    # the check can fail: the multikey kind's key list holds words of the train filler
    text = " ".join(p for s in filler_sources("train") for p in _paragraphs(s)).lower()
    assert "anchor" in KEY_WORDS and "anchor" in set(re.findall(r"[a-z]+", text))


@pytest.mark.parametrize("kind", FAMILIES)
def test_enough_phrasings_per_split(kind):
    """>= 24 needle phrasings and >= 24 question phrasings per kind per split, worded
    independently (any statement with any ask and lead), the value before or after its subject,
    stated once or twice; every split offers at least two value shapes and a word list."""
    for split in FAMILY_SPLITS:
        needles = len(NOUNS[split]) * len(STATEMENTS[split]) ** 2
        questions = len(NOUNS[split]) * len(ASKS[split]) * len(LEADS[split])
        assert needles >= 24 and questions >= 24
        first = [f.index("{v}") < f.lower().index("{s}") for f in STATEMENTS[split]]
        assert any(first) and not all(first)
        assert len(VALUE_TYPES[split]) >= 3 and "word" in VALUE_TYPES[split]
        assert len(DECOYS[split]) >= 3 and len(KEYS[split]) >= 24 and len(WORDS[split]) >= 10
    drawn = [task(kind, "dev", seed)["meta"]["factors"] for seed in range(12)]
    assert len({(f["noun"], f["ask"], f["lead"]) for f in drawn}) >= 8
    assert {f["stated"] for f in drawn} == {1, 2}


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(FAMILIES),
    split=st.sampled_from(FAMILY_SPLITS),
    seed=st.integers(0, 2**32 - 1),
    depth=st.floats(0.0, 1.0),
    decoys=st.integers(0, 3),
)
def test_rendered_tasks_use_only_their_splits_factors(kind, split, seed, depth, decoys):
    t = generate_tasks(
        TaskConfig(
            kind=kind,
            split=split,
            n_tasks=1,
            length=(1024,),
            seed=seed,
            depths=(depth,),
            decoys=decoys,
        )
    )[0]
    f = t["meta"]["factors"]
    context, question, answer = t["context"], t["question"], t["answer"]
    needles = [context[a:b] for a, b in t["needle_spans"]]
    noun = NOUNS[split][f["noun"]].lower()
    values = answer.strip().split(", ")
    assert answer == " " + answer.strip() and not question.endswith(" ")
    # each asked needle holds its value and the noun; the question names the noun, no value
    assert all(noun in n.lower() or noun + "s" in n.lower() for n in needles)
    assert noun in question.lower() and not any(v in question for v in values)
    shape = f["value_type"]
    for v in values:
        if shape.startswith("digits"):
            assert re.fullmatch(rf"[1-9]\d{{{int(shape[6:]) - 1}}}", v)
        elif shape == "word":
            assert v in WORDS[split]
        else:
            pattern = shape[5:].replace("L", "[A-Z]").replace("D", r"\d")
            assert re.fullmatch(pattern, v)
    if kind == "niah-multivalue":  # all values of one key, in the order the text states them
        assert len(needles) == len(values) == 3
        in_order = [context[a:b] for a, b in sorted(t["needle_spans"])]  # the text's order
        assert all(v in n for v, n in zip(values, in_order, strict=True))
    else:  # one value per asked needle, in the order asked
        assert all(v in n for v, n in zip(values, needles, strict=True))
        assert len(values) == (2 if kind == "niah-multiquery" else 1)
    if kind != "niah-single":  # every asked key is named in the question
        keys = [KEYS[split][j] for j in f["keys"]]
        n_asked = 2 if kind == "niah-multiquery" else 1
        assert all(re.search(rf"\b{k}\b", question) for k in keys[:n_asked])
        assert not any(re.search(rf"\b{k}\b", question) for k in keys[n_asked:])
        assert len(set(keys)) == len(keys) == 4
    # decoys: the question's subject, present, carrying no value
    found = [d for d in DECOYS[split] if d[4:12].lower() in context.lower()]
    assert len(f["decoys"]) == decoys and (decoys == 0 or found)
    # nothing of another split: no frame wording, no noun, key or word value
    text = " ".join(needles) + question
    for other in FAMILY_SPLITS:
        if other != split:
            theirs = set().union(*(grams(x) for fr in FRAMES for x in FACTORS[fr][other]))
            assert not grams(text) & theirs
            for w in (*NOUNS[other], *KEYS[other], *WORDS[other]):
                assert not re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE), (other, w)
    # depth: the first asked needle's depth (multi-value: the text's first is no later)
    assert min(a for a, _ in t["needle_spans"]) <= (
        depth * len(context) + MAX_GAP / 2 + 0.01 * len(context)
    )
    n_tokens = approx_tokens(context + question) + approx_tokens(answer)
    assert 0.97 * 1024 <= n_tokens <= 1024


def test_decoys_carry_no_value_and_share_the_question_subject():
    t = task("niah-multikey", "heldout", 5, decoys=4, value_type="digits5")
    f, context = t["meta"]["factors"], t["context"]
    key = KEYS["heldout"][f["keys"][0]]
    subject = f"the {NOUNS['heldout'][f['noun']]} of {key}"
    sentences = [
        d.format(s=subject, S=subject[:1].upper() + subject[1:]) for d in DECOYS["heldout"]
    ]
    present = [s for s in sentences if s in context]
    assert len(present) == len(set(f["decoys"])) and all(not re.search(r"\d", s) for s in present)
    assert subject in t["question"]


def test_dev_filler_reads_only_gistnet_validation_text_and_shares_nothing_with_train():
    """Dev tasks read GistNet's validation documents only; no dev paragraph shares 200 characters
    with GistNet's train text (it may share with validation text, which GistNet selects on)."""
    assert set(filler_sources("dev")).isdisjoint(filler_sources("train"))
    assert set(filler_sources("dev")).isdisjoint(filler_sources("heldout"))
    assert len([s for s in filler_sources("dev") if _paragraphs(s)]) >= 6
    seen = re.sub(r"\s+", " ", " ".join(corpus_text(c, "train") for c in ("pydoc", "stdlib")))
    windows = {seen[i : i + 100] for i in range(0, len(seen) - 99, 100)}
    paragraphs = [re.sub(r"\s+", " ", p) for s in filler_sources("dev") for p in _paragraphs(s)]
    assert sum(map(len, paragraphs)) > 40_000
    shared = [p for p in paragraphs if any(p[i : i + 100] in windows for i in range(len(p) - 99))]
    assert not shared, shared[0][:200]


def test_a_value_of_each_type_has_its_shape():
    import numpy as np

    rng = np.random.default_rng(0)
    assert re.fullmatch(r"[A-Z]{2}-\d{4}", draw_value("code:LL-DDDD", "heldout", rng))
    assert re.fullmatch(r"[1-9]\d{4}", draw_value("digits5", "heldout", rng))
    with pytest.raises(ConfigError, match="unknown value type"):
        draw_value("emoji", "train", rng)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(kind="passkey", split="dev"), "has no 'dev' split"),
        (dict(kind="niah-single", split="train", value_type="digits5"), "not a train value type"),
        (dict(kind="niah-multiquery", n_keys=2, n_queries=3), "n_queries <= n_keys"),
        (dict(kind="niah-multiquery", n_queries=0), "1 <= n_queries"),
        (dict(kind="niah-multivalue", n_values=0), "n_values >= 1"),
        (dict(kind="niah-single", decoys=-1), "decoys >= 0"),
        (dict(kind="niah-multikey", split="dev", n_keys=40), "n_keys must be <= 24"),
        # more distinct word values than the split's list (drawing them would never end)
        (dict(kind="niah-multikey", split="dev", n_keys=11), "needs 11 distinct values"),
        (dict(kind="niah-multivalue", split="heldout", n_values=8, n_keys=4), "needs 11 distinct"),
        (dict(kind="passkey", decoys=3), "does not read decoys"),
        (dict(kind="multikey", value_type="digits5", n_values=2), "value_type"),
        (dict(kind="code", cycle_filler=True), "does not read cycle_filler"),
        (dict(kind="niah-single", lead="verbatim"), "lead must be one of"),
        (dict(kind="niah-multivalue", lead="echo"), "asks several values"),
        (dict(kind="passkey", lead="echo"), "does not read lead"),
    ],
)
def test_bad_family_configs_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        TaskConfig(**bad)


def test_sizes_a_variant_does_not_read_are_not_checked_and_digits_need_no_words():
    TaskConfig(kind="niah-single", n_keys=1)  # n_queries belongs to multiquery alone
    TaskConfig(kind="niah-multikey", n_keys=1)
    TaskConfig(kind="niah-multikey", split="dev", n_keys=11, value_type="digits8")


def test_same_seed_same_tasks():
    a = generate_tasks(TaskConfig(kind="niah-multiquery", split="dev", n_tasks=3, seed=4))
    b = generate_tasks(TaskConfig(kind="niah-multiquery", split="dev", n_tasks=3, seed=4))
    assert a == b and len({t["context"] for t in a}) == 3


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["niah-single", "niah-multikey"]),
    split=st.sampled_from(FAMILY_SPLITS),
    seed=st.integers(0, 10_000),
)
def test_an_echo_lead_repeats_the_asked_needles_own_link(kind, split, seed):
    """lead='echo': the asked needle's first statement names its subject first, and the question
    ends with the words that precede the value there; the other needles and the answer are the
    independent lead's own draw."""
    t = task(kind, split, seed, lead="echo")
    plain = task(kind, split, seed)
    f = t["meta"]["factors"]
    assert f["lead"] == "echo" and isinstance(plain["meta"]["factors"]["lead"], int)
    def needles(x):
        return [x["context"][a:b] for a, b in x["needle_spans"]]

    assert t["answer"] == plain["answer"] and needles(t)[1:] == needles(plain)[1:]
    frame = STATEMENTS[split][f["statements"][0]]
    asked = t["context"][slice(*t["needle_spans"][0])]
    value = t["answer"].strip()
    lead = t["question"].split("? ")[-1].split(". ")[-1]
    # the echoed statement names its subject first, and the lead is, word for word, what the
    # needle says right before its value
    assert subject_first(frame)
    before = asked[: asked.index(value)].rstrip()
    assert before.lower().endswith(lead.lower()), (before, lead)
    assert len(lead.split()) >= 3


def test_echo_lead_of_each_frame():
    assert echo_lead("A quick note: {s} happens to be {v}.") == "{S} happens to be"
    assert echo_lead("{S} was fixed at {v} this morning.") == "{S} was fixed at"
    assert echo_lead("{v} turned out to be {s}.") == "{S} {be}"
    assert not subject_first("Memorise {v}; it stands for {s}.")
    with pytest.raises(ValueError, match="subject and value once"):
        echo_lead("{v} only")
