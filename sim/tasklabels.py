"""Question-time traces of the task worlds for LensNet: ``python -m sim.tasklabels``.

Each task (generated from the registered kinds on the *train* split, or read from a JSONL file) is
streamed to question time once; ``covers`` snapshots are labelled per task: the question-time
recency cover, then covers reached from it by one or two allocator rounds on random block
relevances (so LensNet also sees L2 gists opened, blocks already at L0, 4k streams' three L2 gists).
Every snapshot carries LensNet's task inputs (``sim.taskworld.features.lensnet_item``): the
question's token embeddings as extra tail latents and each entry's attention features
(``sim.taskworld.keystore``).

Labels (``--labels``):
- ``cheap``: one LM forward per task (the stream with the answer teacher-forced after it, the same
  forward that gives the attention features): a block's relevance is the attention the positions
  that predict the answer put on it (``sim.taskworld.features.answer_relevance``); a gist's target
  is the best relevance among its blocks, a sibling group's collapse cost the best relevance under
  it (discounted for groups of gists: ``GROUP_DISCOUNT``), in relevance units (the scale is fitted
  afterwards: ``sim.calibrate.fit_task_calibration``).
  ``cost.jsonl`` records each task's forward (the cheap label's whole cost) in seconds.
- ``exact``: the counterfactual labels (``megacontext.labels.label_snapshot`` with the two-level
  lookahead: every legal action, one LM call each). In this mode every snapshot's cheap targets are
  computed too and ``agreement.jsonl`` records, per snapshot, whether the best exact action is the
  cheap labels' top 1 / in their top 3, the Spearman correlation over the candidates, and the
  seconds each labeller spent on it.
- ``hybrid``: the cheap relevance picks candidates, the LM labels them exactly: the exact expand
  gain (NLL change, nats) of the ``exact_top`` gists the cheap label ranks first (a level-2 one
  also expanded with its best-relevance ``lookahead_children`` children: the two-level
  lookahead restricted to them), every other gist's gain 0, and every sibling group's exact
  collapse cost: about ``exact_top`` + the groups + lookahead forwards per snapshot instead of one
  per legal action. Needs the stream within the LM's window (the cheap relevance is a full read).

Sharded (``--shard i/n`` takes tasks with index % n == i) and resumable: a rerun skips, per task,
the covers already on disk (``megacontext.traces.TraceWriter``; a task that failed wrote none).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from megacontext.allocator import FocusAllocator
from megacontext.cli import from_dict, run_cli, to_dict
from megacontext.labels import label_snapshot, snapshot_record, target_utility
from megacontext.traces import FEATURE_KEY, TraceReader, TraceWriter, parse_shard
from megacontext.tree import ConfigError
from megacontext.working_context import WorkingContext
from sim.taskworld.features import lensnet_item, relevance_scores
from sim.taskworld.keystore import n_entry_features
from sim.taskworld.world import (
    PreparedTask,
    TaskError,
    TaskWorldConfig,
    check_query_fits,
    load_reader,
    prepare_task,
)


@dataclass
class TaskLabelArgs:
    """Label question-time snapshots of task worlds (cheap attention labels or exact ones)."""

    out: str = "runs/task-traces"
    """Output trace directory (with --shard i/n and n > 1: OUT/part-i-of-n)."""
    tasks: str | None = None
    """A task JSONL file; unset: generate --n-tasks tasks of each of --kinds (train split), kinds
    interleaved (so every shard mixes them)."""
    kinds: tuple[str, ...] = ("passkey", "multikey", "vt", "code")
    """Task kinds to generate (``sim.tasks.kinds.TASK_KINDS``)."""
    n_tasks: int = 64
    """Generated tasks per kind."""
    first_task: int = 0
    """Index of the first generated task of each kind (validation sets take a disjoint range)."""
    length: tuple[int, ...] = (2048, 4096)
    """Generated tasks' lengths in tokens (task i takes length[i % len])."""
    seed: int = 0
    """Task generation seed; also the random covers' (with the task index)."""
    covers: int = 4
    """Snapshots per task: the question-time cover, then covers-1 reached by random zoom rounds."""
    labels: Literal["cheap", "exact", "hybrid"] = "cheap"
    """Label source (see the module doc)."""
    exact_top: int = 4
    """hybrid: gists (ranked by the cheap label) whose expand gain is labelled exactly."""
    lookahead_children: int = 2
    """hybrid: children (ranked by the cheap relevance) each level-2 candidate is also expanded
    with, for its two-level lookahead gain."""
    feature_set: str = "relative-lexical"
    """LensNet's per-entry features (``sim.taskworld.keystore.FEATURE_SETS``): 'attention' (absolute
    log attention masses), 'relative-lexical' (the masses relative to the context, plus BM25 against
    the question) or 'prior-lexical' (those, plus the BM25 baseline's own score: the prior a
    LensNet trained on them starts from, ``sim.tasktrain --prior``)."""
    query_tokens: int = 32
    """Newest tokens whose embeddings join LensNet's tail latents (must cover the question)."""
    shard: str = "0/1"
    """i/n: this process takes the tasks with index % n == i."""
    refeature_from: str | None = None
    """Only copy these traces to --out with LensNet's inputs recomputed and the labels kept
    (``refeature``), then stop."""
    retarget_from: str | None = None
    """Only copy these cheap-label traces (written before the group discount) to --out with the
    discount applied (``retarget``), then stop."""
    shard_size: int = 64
    """Snapshots per safetensors shard."""
    lm: str = "smollm2"
    """'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    gister: str = "auto"
    """'auto' (GistNet when a checkpoint fits, else mean pooling), 'gistnet' or 'mean'."""
    progress: bool = True
    """Show a progress bar."""
    world: TaskWorldConfig = field(default_factory=TaskWorldConfig)

    @classmethod
    def from_meta(cls, meta: dict, **overrides) -> TaskLabelArgs:
        """The arguments whose run wrote traces with manifest ``meta``: the same tasks (file or
        generation spec), covers and world; ``overrides`` replace fields (e.g. another task
        range)."""
        spec = meta["tasks"]
        kw: dict = {"tasks": spec} if isinstance(spec, str) else {
            "kinds": tuple(spec["kinds"]), "first_task": spec["first"], "n_tasks": spec["n"],
            "length": tuple(spec["length"]), "seed": spec["seed"]}
        kw.update(covers=int(meta["covers"]), world=from_dict(TaskWorldConfig, meta["world"]))
        return cls(**{**kw, **overrides})


GROUP_DISCOUNT = 0.5
"""A sibling group of level-l entries costs GROUP_DISCOUNT**l times the best relevance under it:
collapsing tokens into their L1 gist gives up all of a block's token detail, collapsing L1 gists
into an L2 gist less (the gists keep part of it). Without the discount a gist in a legal group would
carry gain - cost <= 0 whatever it holds (its own relevance is in both), so after a zoom round opens
an L2 gist the needle's L1 child would be labelled 0 and never opened."""


def cheap_targets(wc: WorkingContext, block_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expand gain, collapse cost) per entry from a relevance per L1 block: a gist's gain is the
    best relevance among its blocks (``relevance_scores``' gist side); every member of a legal
    sibling group of level-l entries carries ``GROUP_DISCOUNT``**l times the best relevance under
    the group (what collapsing it gives up)."""
    rel = relevance_scores(wc, np.clip(block_rel, 0.0, None))
    gain = np.where(wc.levels >= 1, np.clip(rel, 0.0, None), 0.0)
    detail = np.abs(rel)  # the best relevance each entry covers (L0: its block's)
    gid = wc.group_ids()
    cost = np.zeros(len(wc))
    for s in np.unique(gid[gid >= 0]):
        cost[gid == s] = detail[s : s + wc.block_size].max() * GROUP_DISCOUNT ** wc.levels[s]
    return gain, cost


def hybrid_candidates(
    wc: WorkingContext, gain: np.ndarray, block_rel: np.ndarray, top: int, n_children: int
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """The hybrid label's candidates: the ``top`` expandable gists of highest cheap ``gain`` (ties:
    oldest first), and for each one of level >= 2 its ``n_children`` children (node indices one
    level down) whose best L1 block has the highest relevance, for the restricted lookahead."""
    expandable = np.flatnonzero(wc.can_expand())
    order = expandable[np.argsort(-gain[expandable], kind="stable")][:top]
    b = wc.block_size
    rel = np.asarray(block_rel, dtype=np.float64)
    children: dict[int, list[int]] = {}
    for i in order:
        level = int(wc.levels[i])
        if level >= 2:
            kids = np.arange(int(wc.indices[i]) * b, (int(wc.indices[i]) + 1) * b)
            span = b ** (level - 2)  # L1 blocks under one child
            best_block = np.array([rel[k * span : (k + 1) * span].max(initial=-np.inf)
                                   for k in kids])
            best = kids[np.argsort(-best_block, kind="stable")][:n_children]
            children[int(i)] = [int(k) for k in best]
    return np.sort(order), children


def retarget(src: str | Path, dst: str | Path) -> Path:
    """Copy cheap-label traces written before ``GROUP_DISCOUNT`` (their manifest lacks
    ``group_discount``) with each group's collapse cost discounted and the targets recomputed:
    exactly what ``cheap_targets`` now writes for the same snapshots (each stored cost is the best
    relevance under the group, the stored gains are unchanged)."""
    reader = TraceReader(src, require_complete=True)
    if reader.meta.get("labels") != "cheap" or "group_discount" in reader.meta:
        raise ConfigError(f"{src}: not cheap-label traces from before the group discount")
    writer = TraceWriter(dst, {**reader.meta, "group_discount": GROUP_DISCOUNT,
                               "retargeted_from": str(src)})
    if writer.n_done:
        raise ConfigError(f"{dst}: already holds snapshots; use a new directory")
    for i in range(len(reader)):
        snap = dict(reader[i])
        cost = snap["collapse_cost"] * GROUP_DISCOUNT ** snap["levels"].astype(np.float64)
        snap["collapse_cost"] = cost.astype(np.float32)
        snap["target_utilities"] = target_utility(
            snap["expand_gain"], cost, snap["can_expand"], snap["can_collapse"]
        ).astype(np.float32)
        writer.add(snap)
    writer.close()
    _copy_logs(src, dst)
    return Path(dst)


def _record(item: dict, wc: WorkingContext, gain, cost, doc_id: int, baseline_nll=np.nan) -> dict:
    """A trace snapshot from a LensNet item and its labels (``megacontext.labels.snapshot_record``,
    the ``label_snapshot`` format) with the item's tail latents (tail gists, then the query's
    tokens) and entry features."""
    rec = snapshot_record(wc.arrays(1), wc.n_tokens, gain, cost, doc_id, baseline_nll)
    rec.update({k: item[k] for k in ("tail_gists", "tail_levels", "tail_mask", FEATURE_KEY)})
    return rec


def random_covers(pt: PreparedTask, config: TaskWorldConfig, n: int, seed: int) -> list:
    """The question-time cover, then ``n``-1 covers reached from it by one or two allocator rounds
    on random block relevances (every other one with the cheap label's best block ranked first, so
    that covers with the answer's block already open are seen too)."""
    covers = [pt.wc.copy()]
    b = config.block_size
    n_l1 = pt.n_tokens // b
    alloc = FocusAllocator(replace(config.allocator, cooldown=0))
    for c in range(1, n):
        rng = np.random.default_rng([seed, c])
        wc = pt.wc.copy()
        rel = rng.random(n_l1)
        if c % 2 == 0 and pt.answer_relevance is not None and n_l1:
            rel[int(np.argmax(pt.answer_relevance))] = 1.0
        for _ in range(1 + (c % 2)):
            alloc.step(wc, relevance_scores(wc, rel))
        covers.append(wc)
    return covers


def agreement(exact: np.ndarray, cheap: np.ndarray, mask: np.ndarray, can_expand) -> dict:
    """Whether the best exact expand is the cheap labels' top 1 / in their top 3 (among expandable
    entries), its rank in the cheap order (``best_rank``, 1 = first: a hybrid label with
    ``exact_top`` >= that rank labels it exactly), and the Spearman correlation of the two over
    every labelled candidate."""
    cand = np.flatnonzero(can_expand)
    out: dict = {"top1": None, "top3": None, "best_rank": None, "spearman": None}
    if cand.size and exact[cand].max() > 0:
        best = cand[int(np.argmax(exact[cand]))]
        order = cand[np.argsort(-cheap[cand], kind="stable")]
        out["top1"] = bool(order[0] == best)
        out["top3"] = bool(best in order[:3])
        out["best_rank"] = int(np.flatnonzero(order == best)[0]) + 1
    lab = np.flatnonzero(mask)
    if lab.size > 2 and np.ptp(exact[lab]) > 0 and np.ptp(cheap[lab]) > 0:
        out["spearman"] = spearman(exact[lab], cheap[lab])
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, ranks)
    return (sums / np.bincount(inv))[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties take their mean rank)."""
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def agreement_summary(exact_dir: str | Path, cheap_dir: str | Path | None = None) -> dict:
    """The cheap labels against the exact ones over the snapshots of an exact-label run
    (``agreement.jsonl``; a resumed run's repeated rows count once): top-1 / top-3 hit rates of the
    best exact expand, mean Spearman, and the throughput of both labellers on the same tasks in the
    same run: exact seconds per snapshot, the cheap label's seconds per task forward
    (``cost.jsonl``), and the speed-up in snapshots per second at one snapshot per forward and at
    the covers per forward of the cheap training run ``cheap_dir`` (each forward labels that many
    snapshots)."""
    def lines(d, name: str) -> list[str]:  # one run directory, or its --shard parts
        files = [Path(d) / name] if (Path(d) / name).exists() else sorted(
            Path(d).glob(f"part-*-of-*/{name}")
        )
        return [x for f in files for x in f.read_text().splitlines()]

    rows = {}
    for line in lines(exact_dir, "agreement.jsonl"):
        r = json.loads(line)
        rows[(r["task"], r["cover"])] = r
    rs = list(rows.values())
    hit1 = [r["top1"] for r in rs if r["top1"] is not None]
    hit3 = [r["top3"] for r in rs if r["top3"] is not None]
    rho = [r["spearman"] for r in rs if r["spearman"] is not None]
    ranks = [r["best_rank"] for r in rs if r.get("best_rank") is not None]
    exact_s = float(np.mean([r["exact_s"] for r in rs]))
    def costs(d) -> list[dict]:
        return list({c["task"]: c for c in map(json.loads, lines(d, "cost.jsonl"))}.values())

    cost = [c for c in costs(exact_dir) if any(r["task"] == c["task"] for r in rs)]
    forward_s = float(np.mean([c["forward_s"] for c in cost]))
    covers = int(costs(cheap_dir or exact_dir)[0]["covers"])
    by_kind: dict[str, list] = {}
    for r in rs:
        by_kind.setdefault(r.get("kind") or "?", []).append(r)
    return {
        "snapshots": len(rs),
        "top1": float(np.mean(hit1)) if hit1 else None,
        "top3": float(np.mean(hit3)) if hit3 else None,
        "n_with_a_gain": len(hit1),
        "spearman_mean": float(np.mean(rho)) if rho else None,
        # the share of snapshots whose best exact expand a hybrid label with exact_top k labels
        "best_in_cheap_top_k": ({k: float(np.mean(np.asarray(ranks) <= k)) for k in (1, 2, 4, 8)}
                                if ranks else None),
        "per_kind": {
            k: {
                "snapshots": len(v),
                "top1": float(np.mean([r["top1"] for r in v if r["top1"] is not None] or [np.nan])),
                "top3": float(np.mean([r["top3"] for r in v if r["top3"] is not None] or [np.nan])),
                "spearman_mean": float(np.mean([r["spearman"] for r in v
                                                if r["spearman"] is not None] or [np.nan])),
            }
            for k, v in sorted(by_kind.items())
        },
        "exact_s_per_snapshot": exact_s,
        "cheap_forward_s_per_task": forward_s,
        "cheap_tasks": len(cost),
        "covers_per_forward": covers,
        "speedup_one_snapshot_per_forward": exact_s / forward_s,
        "speedup_at_covers": exact_s * covers / forward_s,
    }


def trace_feature_set(meta: dict, path: str | Path) -> str:
    """The per-entry feature set (``sim.taskworld.keystore.FEATURE_SETS``) named by the manifest
    ``meta`` of the trace at ``path``. A manifest without ``feature_set`` is an error, never a
    guess: two sets can have the same width, so a LensNet would silently read features it was not
    built for."""
    if not meta.get("feature_set"):
        raise ConfigError(
            f"{path}: the trace manifest's meta has no 'feature_set' (its entry features: "
            f"{meta.get('n_entry_features', 0)} per entry, of an unnamed set); recompute them "
            f"with python -m sim.tasklabels --refeature-from {path} --out DIR --feature-set SET"
        )
    return str(meta["feature_set"])


def _copy_logs(src: str | Path, dst: str | Path) -> None:
    """The labelling run's logs (cost, agreement with exact labels) travel with its traces."""
    for log in ("cost.jsonl", "agreement.jsonl"):
        if (Path(src) / log).exists():
            (Path(dst) / log).write_text((Path(src) / log).read_text())


def refeature(
    src: str | Path, dst: str | Path, lm: str = "smollm2", feature_set: str | None = None
) -> Path:
    """Copy a task trace with LensNet's inputs (tail latents, attention features) recomputed by
    the current code and the labels kept: the same tasks and covers are rebuilt from ``src``'s
    manifest (one attention forward per task, no labelling) and each cover is checked to equal the
    stored one. For exact-label traces, whose labels cost minutes a snapshot, when the features
    change. ``feature_set`` (default: the one the source's manifest names, ``trace_feature_set``)
    picks the recomputed features."""
    reader = TraceReader(src, require_complete=True)
    meta = reader.meta
    feature_set = feature_set or trace_feature_set(meta, src)
    args = TaskLabelArgs.from_meta(meta)
    llm = load_reader(lm, meta["oracle"].get("gister", "auto"), args.world.block_size)
    n_query = int(meta["n_query_tokens"])
    n_features = n_entry_features(llm.model.config.num_hidden_layers, feature_set)
    new_meta = {**meta, "feature_set": feature_set, "refeatured_from": str(src),
                "n_entry_features": n_features}
    writer = TraceWriter(dst, new_meta)
    if writer.n_done:
        raise ConfigError(f"{dst}: already holds snapshots; use a new directory")
    where, seen = {}, Counter()  # (doc id, cover) -> snapshot: a task's covers are in order
    for i, d in enumerate(reader.snapshots["doc_id"].tolist()):
        where[(d, seen[d])] = i
        seen[d] += 1
    w = args.world
    for doc_id, task in enumerate(_tasks(args, llm.own_tokenizer)):
        if (doc_id, 0) not in where:
            continue  # the labelling run skipped this task
        pt = prepare_task(task, llm.oracle, llm.tokenizer, w, llm.gister, features=False,
                          attention=True, answer_attention=True)
        for c, wc in enumerate(random_covers(pt, w, args.covers, args.seed * 100003 + doc_id)):
            snap = dict(reader[where[(doc_id, c)]])
            if not (np.array_equal(snap["levels"], wc.levels)
                    and np.array_equal(snap["node_index"], wc.indices)):
                raise ConfigError(f"{src}: task {task['id']} cover {c} is not the stored one")
            item = lensnet_item(wc, w.n_tail_gists, n_query,
                                pt.question_attention(wc, llm.oracle), feature_set,
                                pt.block_lexical, pt.query)
            snap.update({k: item[k] for k in ("tail_gists", "tail_levels", "tail_mask")})
            snap[FEATURE_KEY] = item[FEATURE_KEY]
            writer.add(snap)
    writer.close()
    _copy_logs(src, dst)
    return Path(dst)


def _tasks(args: TaskLabelArgs, tokenizer) -> list[dict]:
    if args.tasks:
        from sim.tasks.jsonl import read_tasks

        return read_tasks(args.tasks)
    from sim.tasks import TaskConfig, make_task
    from sim.tasks.filler import token_counter

    count = token_counter(tokenizer) if tokenizer is not None else (lambda s: len(s))
    name = args.lm if tokenizer is not None else "chars"  # the token counter the meta records
    per_kind = [
        [
            make_task(TaskConfig(kind=kind, length=args.length, split="train", seed=args.seed),
                      i, count, name)
            for i in range(args.first_task, args.first_task + args.n_tasks)
        ]
        for kind in args.kinds
    ]
    return [t for group in zip(*per_kind, strict=True) for t in group]  # kinds interleaved


def generate(args: TaskLabelArgs) -> Path:
    """Label every task's covers into the trace directory (resuming); returns it."""
    from sim.tasks.jsonl import refuse_sealed

    if args.tasks:  # labels are training data: never from the sealed test split
        refuse_sealed(args.tasks, "sim.tasklabels")
    i_shard, n_shard = parse_shard(args.shard)
    out = Path(args.out) if n_shard == 1 else Path(args.out) / f"part-{i_shard}-of-{n_shard}"
    if args.covers < 1 or args.query_tokens < 1:
        raise ConfigError(f"need covers >= 1 and query_tokens >= 1, got {args.covers}, "
                          f"{args.query_tokens}")
    lm = load_reader(args.lm, args.gister, args.world.block_size)
    writer = TraceWriter(out, _trace_meta(args, lm), shard_size=args.shard_size)
    # resume: per task (doc id) the covers already on disk; a task that failed wrote none
    on_disk = Counter(TraceReader(out).snapshots["doc_id"].tolist()) if writer.n_done else Counter()
    tasks = [(i, t) for i, t in enumerate(_tasks(args, lm.own_tokenizer)) if i % n_shard == i_shard]
    log = (out / "agreement.jsonl").open("a") if args.labels == "exact" else None
    cost_log = (out / "cost.jsonl").open("a")  # per task: the cheap label's forward, in seconds
    w = args.world
    for doc_id, task in tqdm(tasks, desc=f"label {out.name}", disable=not args.progress):
        done = on_disk[doc_id]
        if done >= args.covers:  # whole task already on disk
            continue
        try:
            pt = prepare_task(task, lm.oracle, lm.tokenizer, w, lm.gister, features=False,
                              attention=True, answer_attention=True)
            check_query_fits(pt, args.query_tokens, "--query-tokens")
        except TaskError as err:
            print(f"skipped: {err}")
            continue
        cost_log.write(json.dumps({"task": task["id"], "n_tokens": pt.n_tokens,
                                   "forward_s": pt.label_s, "covers": args.covers}) + "\n")
        cost_log.flush()
        for c, wc in enumerate(random_covers(pt, w, args.covers, args.seed * 100003 + doc_id)):
            if c >= done:
                _label_cover(args, pt, wc, lm.oracle, (doc_id, c), writer, log)
    writer.close()
    cost_log.close()
    if log is not None:
        log.close()
    return out


def _trace_meta(args: TaskLabelArgs, lm) -> dict:
    """The trace manifest's meta: LensNet's inputs, the world, the labels and the tasks."""
    w = args.world
    return {
        "d_model": lm.oracle.d_model,
        "n_tail": w.n_tail_gists + args.query_tokens,
        "n_tail_gists": w.n_tail_gists,
        "n_query_tokens": args.query_tokens,
        "n_entry_features": n_entry_features(lm.model.config.num_hidden_layers, args.feature_set),
        "feature_set": args.feature_set,
        "block_size": w.block_size,
        "max_level": w.max_level,
        "world": to_dict(w),
        "labels": args.labels,
        **({"group_discount": GROUP_DISCOUNT} if args.labels == "cheap" else {}),
        **({"exact_top": args.exact_top, "lookahead_children": args.lookahead_children}
           if args.labels == "hybrid" else {}),
        "oracle": {"kind": "lm", "lm": args.lm, "gister": lm.gister_name},
        "tasks": args.tasks or {"kinds": list(args.kinds), "first": args.first_task,
                                "n": args.n_tasks, "length": list(args.length), "seed": args.seed},
        "covers": args.covers,
        "shard": args.shard,
    }


def _label_cover(args: TaskLabelArgs, pt: PreparedTask, wc, oracle, where: tuple[int, int],
                 writer: TraceWriter, log) -> None:
    """One cover's snapshot with its labels (``args.labels``: cheap, hybrid or exact; exact also
    logs its agreement with the cheap label to ``log``). ``where``: (doc id, cover)."""
    doc_id, c = where
    w = args.world
    item = lensnet_item(wc, w.n_tail_gists, args.query_tokens, pt.question_attention(wc, oracle),
                        args.feature_set, pt.block_lexical, pt.query)
    t1 = time.perf_counter()  # the cheap label's cost: targets, plus its share of the read
    gain, cost = cheap_targets(wc, pt.answer_relevance)
    t_cheap = time.perf_counter() - t1 + pt.label_s / args.covers
    if args.labels == "cheap":
        writer.add(_record(item, wc, gain, cost, doc_id))
    elif args.labels == "hybrid":
        slots, children = hybrid_candidates(wc, gain, pt.answer_relevance, args.exact_top,
                                            args.lookahead_children)
        lab = label_snapshot(wc, oracle, pt.answer_ids, wc.n_tokens, w.n_tail_gists, doc_id,
                             lookahead=w.lookahead, expand_slots=slots, children=children)
        rec = _record(item, wc, lab["expand_gain"], lab["collapse_cost"], doc_id,
                      lab["baseline_nll"])
        # a gist whose expand was not labelled is no evidence: out of the loss (its collapse
        # label goes with it; the target mixes the two)
        unlabelled = wc.can_expand() & ~np.isin(np.arange(len(wc)), slots)
        rec["action_mask"] = rec["action_mask"] & ~unlabelled
        writer.add(rec)
    else:
        t2 = time.perf_counter()
        lab = label_snapshot(wc, oracle, pt.answer_ids, wc.n_tokens, w.n_tail_gists, doc_id,
                             lookahead=w.lookahead)
        t_exact = time.perf_counter() - t2
        writer.add(_record(item, wc, lab["expand_gain"], lab["collapse_cost"], doc_id,
                           lab["baseline_nll"]))
        cheap = target_utility(gain, cost, wc.can_expand(), wc.can_collapse())
        row = {"task": pt.task["id"], "cover": c, "kind": (pt.task.get("meta") or {}).get("kind"),
               "n_tokens": pt.n_tokens, "entries": len(wc),
               **agreement(lab["target_utilities"], cheap, lab["action_mask"], wc.can_expand()),
               "exact_s": t_exact, "cheap_s": t_cheap}
        log.write(json.dumps(row) + "\n")
        log.flush()


def _label_traces(args: TaskLabelArgs) -> Path:
    """What ``python -m sim.tasklabels`` was asked: refeature, retarget or label."""
    if args.refeature_from:
        return refeature(args.refeature_from, args.out, args.lm, args.feature_set)
    if args.retarget_from:
        return retarget(args.retarget_from, args.out)
    return generate(args)


def main(argv: list[str] | None = None) -> None:
    _, out = run_cli(TaskLabelArgs, _label_traces, argv)
    print(f"wrote {len(TraceReader(out))} snapshots to {out}")


if __name__ == "__main__":
    main()
