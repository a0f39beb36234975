"""Needle task families: RULER's needle-in-a-haystack variants (single, multi-key, multi-value,
multi-query; Hsieh et al. 2024, §3.1) with every factor of a task drawn from its split's own pool,
so a scorer trained on 'train' and selected on 'dev' meets on 'heldout' (test) phrasings, keys,
values and filler it has never seen: templates cannot carry over, only reading can.

A task's factors (``FACTORS``: each maps split -> its values, no value in two splits):

- ``nouns``: what the needle names ('pass key', 'locker number', ...);
- ``statements``: how a needle states its value, the value before or after its subject; a needle
  states it once or twice (two different statements);
- ``asks`` and ``leads``: the question, worded independently of the needle (an ask, then a lead the
  answer continues). With ``lead='echo'`` the lead instead repeats the asked needle's own link
  (``echo_lead``: 'Per the memo, {s} comes out as {v}.' is asked back as '... {S} comes out as'),
  since a 135M LM copies a value only after the words that preceded it
  (results/families-1/dev-selectors: with independent leads the whole stream in view answers 0 of
  16 single needles); the ask stays independent;
- ``decoys``: sentences that repeat the question's subject but carry no value;
- ``keys``: the key vocabulary of the keyed variants (multi-key, multi-value, multi-query);
- ``values``: value types (digits of several lengths, codes of a letter/digit shape such as
  'LL-DDDD' = XK-4417, and words of the split's own word list);
- ``filler``: the split's documents (``sim.tasks.filler``: GistNet's train / validation / held-out
  text).

The variants, from RULER's definitions: ``niah-single`` one needle, asked back; ``niah-multikey``
``n_keys`` needles under distinct keys, one asked (the others distract); ``niah-multivalue`` one
key stated with ``n_values`` values, all asked (answered in the order the text states them);
``niah-multiquery`` ``n_keys`` keyed needles, ``n_queries`` of them asked in one question (answered
in the order asked). ``decoys`` adds that many decoy sentences at uniform depths to any variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from megacontext.tree import ConfigError
from sim.tasks.needles import CONSONANTS, KEY_WORDS, NeedleKind, Needles

if TYPE_CHECKING:
    from sim.tasks import TaskConfig

FAMILY_SPLITS = ("train", "dev", "heldout")

NOUNS = {
    "train": (
        "pass key",
        "secret number",
        "access code",
        "locker number",
        "vault combination",
        "entry code",
        "backup number",
        "safe code",
        "door code",
        "account number",
    ),
    "dev": (
        "gate token",
        "cabinet count",
        "voucher",
        "ledger mark",
        "crate label",
        "permit serial",
        "shelf tag",
        "relay figure",
    ),
    "heldout": (
        "hidden PIN",
        "override cipher",
        "ticket ID",
        "badge reference",
        "archive stamp",
        "parcel handle",
        "launch phrase",
        "dial position",
    ),
}
"""What a needle names, per split (a noun phrase whose plural adds an 's'); no word of one split's
nouns is in another's (tested)."""

STATEMENTS = {
    "train": (
        "{S} is {v}.",
        "Remember it well: {s} is {v}.",
        "Keep in mind that {s} is {v}.",
        "For the record, {s} is {v}.",
        "{v} is {s}.",
        "Write this down: {v} is {s}.",
        "Do not lose {v}, which is {s}.",
        "It is worth noting that {v} is {s}.",
    ),
    "dev": (
        "Listed here, {s} reads {v}.",
        "{S} has been set to {v}.",
        "Officially, {s} equals {v}.",
        "Someone jotted {v} on a card as {s}.",
        "{v} serves as {s}.",
        "Memorise {v}; it stands for {s}.",
    ),
    "heldout": (
        "A quick note: {s} happens to be {v}.",
        "{S} was fixed at {v} this morning.",
        "Per the memo, {s} comes out as {v}.",
        "Take {v} to be {s} from now on.",
        "{v} turned out to be {s}.",
        "Scribbled in the margin: {v}, known as {s}.",
    ),
}
"""How a needle states value {v} of subject {s} ({S}: capitalised), per split; half put the value
first."""

ASKS = {
    "train": (
        "What {be} {s}?",
        "Recall {s} from the text.",
        "Which value{x} {be} {s}?",
        "Look back for {s}.",
        "Tell me {s}.",
    ),
    "dev": (
        "Search the passage for {s}.",
        "Do you remember {s}?",
        "Name {s}, please.",
        "Find {s} in the document above.",
    ),
    "heldout": (
        "Somewhere above, {s} appeared; which was it?",
        "Report {s} exactly.",
        "What did the text give as {s}?",
        "Can you quote {s}?",
    ),
}
"""The question's first sentence, per split: {s} the asked subject, {be} 'is' or 'are', {x} 's'
for a plural subject."""

LEADS = {
    "train": ("{S} {be}", "The answer: {s} {be}", "According to the text, {s} {be}"),
    "dev": ("Reading back, {s} {be}", "In short, {s} {be}", "Plainly put, {s} {be}"),
    "heldout": (
        "As stated, {s} {be}",
        "Quoted exactly, {s} {be}",
        "Going by the passage, {s} {be}",
    ),
}
"""The question's last words, which the answer continues, per split."""

DECOYS = {
    "train": (
        "Nobody could find {s} that afternoon.",
        "{S} was discussed at length but never settled.",
        "The old note about {s} has been thrown away.",
        "Ask the front desk if you need {s}.",
    ),
    "dev": (
        "A rumour about {s} went around the office.",
        "{S} is kept somewhere safe, they said.",
        "Questions about {s} go to the manager.",
    ),
    "heldout": (
        "Several people argued over {s} without result.",
        "{S} will be announced at a later date.",
        "The paperwork mentioning {s} got misplaced.",
    ),
}
"""Decoy sentences per split: the question's subject, no value."""

KEYS = {
    "train": (  # the multikey kind's words, less the three the train filler uses
        *(w for w in KEY_WORDS if w not in ("apple", "violet", "anchor")),
        "marmot",
        "gecko",
        "tapir",
    ),
    "dev": tuple(
        """acorn basil cedar daisy elm fennel ginger heron indigo jade kestrel lilac mango newt
olive poppy quince robin sage topaz umber vine wren yucca""".split()
    ),
    "heldout": tuple(
        """amber birch coral dahlia ember fig gull hemlock iguana jackal koala lemur marlin
nettle oyster puffin quokka reed sable tansy umbra viper wombat yew""".split()
    ),
}
"""The keyed variants' key vocabulary, per split; no key occurs in its split's filler (tested)."""

WORDS = {
    "train": tuple(
        """copper lumber kazoo tractor biscuit marble ladder spinach trumpet blanket
pencil saucer rocket hammock banjo pillow castle marimba kitten ukulele""".split()
    ),
    "dev": tuple(
        """bucket pretzel cactus goblet muffin paddle siren turnip wagon barrel""".split()
    ),
    "heldout": tuple(
        """compass teapot bonnet scooter walnut lagoon mitten parsnip zipper cobbler""".split()
    ),
}
"""Word values, per split; none occurs in its split's filler (tested): the answer is only in its
needles."""

VALUE_TYPES = {
    "train": ("digits4", "digits6", "digits7", "code:LLL-DD", "code:L-DDDDD", "word"),
    "dev": ("digits8", "code:LLDD-DD", "word"),
    "heldout": ("digits5", "code:LL-DDDD", "word"),
}
"""Value types per split: ``digitsN`` (N digits, no leading zero), ``code:SHAPE`` (L a consonant,
D a digit, other characters kept) and ``word`` (the split's ``WORDS``). The value *shapes* differ
across splits; 'word' draws from disjoint lists."""

FACTORS: dict[str, dict[str, tuple[str, ...]]] = {
    "nouns": NOUNS,
    "statements": STATEMENTS,
    "asks": ASKS,
    "leads": LEADS,
    "decoys": DECOYS,
    "keys": KEYS,
    "words": WORDS,
    "values": VALUE_TYPES,
}
"""Every factor of a family task: name -> split -> its values (disjoint across splits, tested)."""


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(frame: str, s: str, **kw: str) -> str:
    """``frame`` with subject ``s`` ({s}, {S} capitalised) and ``kw``, its first letter capitalised
    unless it opens with its value (a value keeps its case: a word value is asked back as
    stated)."""
    text = frame.format(s=s, S=_cap(s), **kw)
    return text if frame.startswith("{v}") else _cap(text)


LEAD_MODES = ("independent", "echo")
"""How a family question's last words are drawn: from the split's ``LEADS`` (worded apart from the
needle) or echoing the asked needle's statement (``echo_lead``)."""


def _subject_at(frame: str) -> int:
    at = [frame.find(t) for t in ("{s}", "{S}") if t in frame]
    if len(at) != 1 or "{v}" not in frame:
        raise ValueError(f"statement frame {frame!r} must name its subject and value once")
    return at[0]


def subject_first(frame: str) -> bool:
    """Whether a statement frame names its subject before its value."""
    return _subject_at(frame) < frame.index("{v}")


def echo_lead(frame: str) -> str:
    """The lead that asks a value back in its statement's own words: the subject, then the words
    that link it to the value ('{S} happens to be' for 'A quick note: {s} happens to be {v}.').
    With ``lead='echo'`` the asked needle's first statement names its subject first: measured on
    dev, the LM copies none of the values stated first ('{v} turned out to be {s}.', asked back
    as '{S} is'), which it would have to read backwards. A value-first frame still gets '{S} {be}'
    here."""
    at = _subject_at(frame)
    if not subject_first(frame):
        return "{S} {be}"
    link = frame[at + 3 : frame.index("{v}")].strip()
    return "{S} " + link if link else "{S} {be}"


def draw_value(value_type: str, split: str, rng: np.random.Generator) -> str:
    """One value of ``value_type`` (``VALUE_TYPES``) for ``split``."""
    if value_type.startswith("digits"):
        n = int(value_type[len("digits") :])
        return str(rng.integers(10 ** (n - 1), 10**n))
    if value_type.startswith("code:"):
        return "".join(
            CONSONANTS[rng.integers(len(CONSONANTS))]
            if ch == "L"
            else str(rng.integers(10))
            if ch == "D"
            else ch
            for ch in value_type[len("code:") :]
        )
    if value_type == "word":
        return str(WORDS[split][rng.integers(len(WORDS[split]))])
    raise ConfigError(f"unknown value type {value_type!r}")


def check_family_config(c: TaskConfig) -> None:
    """A ``ConfigError`` for a family config its split cannot serve (a value type of another split,
    more keys than the split's vocabulary)."""
    if c.split not in FAMILY_SPLITS:
        raise ConfigError(f"family kinds take split in {FAMILY_SPLITS}, got {c.split!r}")
    variant = getattr(TASK_VARIANTS.get(c.kind), "variant", None)
    if c.value_type != "any" and c.value_type not in VALUE_TYPES[c.split]:
        raise ConfigError(
            f"value_type {c.value_type!r} is not a {c.split} value type; choose 'any' or one of "
            f"{VALUE_TYPES[c.split]}"
        )
    if c.n_keys > len(KEYS[c.split]):
        raise ConfigError(f"n_keys must be <= {len(KEYS[c.split])} for split {c.split!r}")
    if c.lead not in LEAD_MODES:
        raise ConfigError(f"lead must be one of {LEAD_MODES}, got {c.lead!r}")
    if c.lead == "echo" and variant in ("multivalue", "multiquery"):
        raise ConfigError(
            f"lead='echo' repeats one needle's statement; {c.kind} asks several values at once "
            "(use lead='independent')"
        )
    if c.n_values < 1 or c.decoys < 0:
        raise ConfigError(f"need n_values >= 1, decoys >= 0; got {c.n_values}, {c.decoys}")
    if variant == "multiquery" and not 1 <= c.n_queries <= c.n_keys:
        raise ConfigError(
            f"niah-multiquery needs 1 <= n_queries <= n_keys, got {c.n_queries}, {c.n_keys}"
        )
    # every value of a task is distinct: word values can take at most the split's word list
    needed = {"single": 1, "multivalue": c.n_values + c.n_keys - 1}.get(variant, c.n_keys)
    may_draw_words = c.value_type in ("any", "word") and "word" in VALUE_TYPES[c.split]
    if may_draw_words and needed > len(WORDS[c.split]):
        raise ConfigError(
            f"{c.kind} with these sizes needs {needed} distinct values, more than the "
            f"{len(WORDS[c.split])} words of split {c.split!r}: lower n_keys / n_values or pick "
            f"a value_type other than 'word'"
        )


class FamilyKind(NeedleKind):
    """A needle family: the subclass sets ``name`` and ``variant`` (single, multikey, multivalue,
    multiquery); every phrasing is composed from the split's factor pools (``FACTORS``)."""

    variant: str
    splits = FAMILY_SPLITS

    def draw(
        self, c: TaskConfig, rng: np.random.Generator, depth: float
    ) -> tuple[Needles, list[int], str, str, dict[str, Any]]:
        """One task's factors, needles and question (``NeedleKind.draw``). Long by design: its
        draws from ``rng`` come in one fixed order that every drawn task file depends on (the
        studies' TASKS.json hashes)."""
        check_family_config(c)
        split = c.split

        def pick(pool: tuple[str, ...]) -> int:
            return int(rng.integers(len(pool)))

        noun_i = pick(NOUNS[split])
        noun = NOUNS[split][noun_i]
        vtypes = VALUE_TYPES[split] if c.value_type == "any" else (c.value_type,)
        vtype = vtypes[pick(vtypes)]
        twice = bool(rng.integers(2))
        if self.variant not in ("single", "multikey", "multivalue", "multiquery"):
            raise ConfigError(f"unknown family variant {self.variant!r}")
        n_keys = 1 if self.variant == "single" else c.n_keys
        key_idx = rng.choice(len(KEYS[split]), n_keys, replace=False)
        keys = [str(KEYS[split][j]) for j in key_idx]
        used: set[str] = set()
        statement_ids: list[int] = []

        def value() -> str:
            while (v := draw_value(vtype, split, rng)) in used:  # distinct values in one task
                pass
            used.add(v)
            return v

        def needle(subject: str, v: str, asked: bool = False) -> str:
            frames = STATEMENTS[split]
            order = rng.permutation(len(frames))[: 1 + twice]
            if asked and c.lead == "echo":  # the echoed statement puts its subject first
                first = [j for j in rng.permutation(len(frames)) if subject_first(frames[j])][0]
                order = [first, *[j for j in order if j != first]][: 1 + twice]
            statement_ids.extend(int(j) for j in order)
            return " ".join(_fill(frames[j], subject, v=v) for j in order)

        def subject(key: str | None, plural: bool = False, one_of: bool = False) -> str:
            head = f"{noun}s" if plural or one_of else noun
            base = f"the {head}" if key is None else f"the {head} of {key}"
            return f"one of {base}" if one_of else base

        needles: Needles = []
        if self.variant == "multivalue":  # key 0 stated n_values times; the other keys distract
            values = [value() for _ in range(c.n_values)]
            depths = [depth, *rng.uniform(0.0, 1.0, c.n_values - 1)]
            one_of = subject(keys[0], one_of=True)
            needles += [(needle(one_of, v), d) for v, d in zip(values, depths, strict=True)]
            needles += [(needle(subject(k), value()), float(rng.uniform())) for k in keys[1:]]
            asked = list(range(c.n_values))
            answers = [values[j] for j in sorted(asked, key=lambda j: (depths[j], j))]
            ask_subject, be = f"all {subject(keys[0], plural=True)}", "are"
        else:  # one value per key, key 0 at the depth, the rest at uniform depths
            values = [value() for _ in keys]
            depths = [depth, *rng.uniform(0.0, 1.0, n_keys - 1)]
            single = self.variant == "single"
            needles += [
                (needle(subject(None if single else k), v, asked=i == 0), d)
                for i, (k, v, d) in enumerate(zip(keys, values, depths, strict=True))
            ]
            n_asked = c.n_queries if self.variant == "multiquery" else 1
            asked, answers = list(range(n_asked)), values[:n_asked]
            ask_subject, be = subject(None if single else keys[0]), "is"
            if n_asked > 1:
                names = ", ".join(keys[: n_asked - 1]) + f" and {keys[n_asked - 1]}"
                ask_subject, be = f"the {noun}s of {names}", "are"
        decoy_ids = [pick(DECOYS[split]) for _ in range(c.decoys)]
        decoy_subject = subject(keys[0] if self.variant != "single" else None)
        needles += [
            (_fill(DECOYS[split][j], decoy_subject), float(rng.uniform())) for j in decoy_ids
        ]
        ask_i, lead_i = pick(ASKS[split]), pick(LEADS[split])
        # echo: the asked needle (key 0, stated first) asked back in its first statement's words
        lead = LEADS[split][lead_i] if c.lead == "independent" else echo_lead(
            STATEMENTS[split][statement_ids[0]])
        question = " ".join(
            (
                _fill(ASKS[split][ask_i], ask_subject, be=be, x="s" if be == "are" else ""),
                _fill(lead, ask_subject, be=be),
            )
        )
        factors = {
            "variant": self.variant,
            "noun": noun_i,
            "value_type": vtype,
            "stated": 2 if twice else 1,
            "statements": statement_ids,
            "ask": ask_i,
            "lead": lead_i if c.lead == "independent" else "echo",
            "decoys": decoy_ids,
            "keys": [int(j) for j in key_idx] if self.variant != "single" else [],
        }
        return needles, asked, question, " " + ", ".join(answers), {"factors": factors}


class NiahSingle(FamilyKind):
    """'niah-single': one needle, asked back."""

    name, variant = "niah-single", "single"


class NiahMultiKey(FamilyKind):
    """'niah-multikey': ``n_keys`` needles under distinct keys, one asked."""

    name, variant = "niah-multikey", "multikey"


class NiahMultiValue(FamilyKind):
    """'niah-multivalue': one key with ``n_values`` values, all asked (in the text's order); the
    other ``n_keys - 1`` keys distract."""

    name, variant = "niah-multivalue", "multivalue"


class NiahMultiQuery(FamilyKind):
    """'niah-multiquery': ``n_keys`` keyed needles, ``n_queries`` asked at once (in asked order)."""

    name, variant = "niah-multiquery", "multiquery"


FAMILY_KINDS = (NiahSingle(), NiahMultiKey(), NiahMultiValue(), NiahMultiQuery())
TASK_VARIANTS = {kind.name: kind for kind in FAMILY_KINDS}
"""Family kind name -> its kind (``variant``: single, multikey, multivalue, multiquery)."""
