"""Counterfactual labelling (DESIGN.md §3): for one snapshot, the NLL change of every legal action.

Every oracle implements ``sim.oracle.NLLOracle`` (synthetic world, real LM). ``label_snapshot`` evaluates the baseline context,
every single expand and every sibling-group collapse (each ignoring the budget, one action at a
time), and returns the trace record: gains g, costs c, the signed target
``y = g [can expand] - c [group can collapse]``, the action mask, the exact slot costs the allocator
uses (c+ = b - 1, c- = (b - 1) / b), and LensNet's input features with the tail gists.
``python -m sim.labels`` streams documents (synthetic, or real text with ``--world.env lm``) and
writes labelled traces (``--shard i/n``
splits the documents between processes; a rerun resumes after the last complete shard).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sim.cli import parse, to_dict
from sim.oracle import NLLOracle
from sim.traces import TraceReader, TraceWriter
from sim.tree import ConfigError
from sim.working_context import ContextArrays, WorkingContext
from sim.world import WorldConfig, lm_episode, synthetic_episode


def counterfactual_contexts(wc: WorkingContext, n_tail: int = 6) -> tuple[ContextArrays, list[tuple[str, int, ContextArrays]]]:
    """The baseline arrays and, per legal action, (kind, slot, arrays of the context after it).

    ``slot`` is the expanded entry, or the first member of the collapsed group.
    """
    base = wc.arrays(n_tail)
    b = wc.block_size
    variants: list[tuple[str, int, ContextArrays]] = []
    for i in np.flatnonzero(base.can_expand):
        v = wc.copy()
        v.expand(int(base.levels[i]), int(base.node_index[i]))
        variants.append(("expand", int(i), v.arrays(n_tail)))
    for s in np.unique(base.group_id[base.group_id >= 0]):
        v = wc.copy()
        v.collapse(int(base.levels[s]) + 1, int(base.node_index[s]) // b)
        variants.append(("collapse", int(s), v.arrays(n_tail)))
    return base, variants


def lookahead_contexts(wc: WorkingContext, n_tail: int = 6) -> list[tuple[int, ContextArrays]]:
    """Per gist of level >= 2 and per child: (slot, arrays after expanding the gist and then that child).

    The lookahead label of a level >= 2 gist is the best of these two-step expansions (DESIGN §3):
    a single expand leaves the child a gist, so its gain is blind to detail two levels down.
    """
    b = wc.block_size
    out: list[tuple[int, ContextArrays]] = []
    for i in np.flatnonzero(wc.levels >= 2):
        level, index = int(wc.levels[i]), int(wc.indices[i])
        for child in range(index * b, (index + 1) * b):
            v = wc.copy()
            v.expand(level, index)
            v.expand(level - 1, child)
            out.append((int(i), v.arrays(n_tail)))
    return out


def label_snapshot(
    wc: WorkingContext,
    oracle: NLLOracle,
    query_ids: np.ndarray,
    query_start: int,
    n_tail: int = 6,
    doc_id: int = 0,
    lookahead: bool = False,
) -> dict[str, np.ndarray]:
    """A labelled snapshot in the trace format (``sim.traces.ENTRY_KEYS`` + ``SNAPSHOT_KEYS``).

    ``lookahead``: the expand gain of a gist of level >= 2 is max(its single-expand gain, the best
    gain of expanding it and then one of its children) — see ``lookahead_contexts``.
    """
    if query_start != wc.n_tokens:
        raise ValueError(f"the query must start at the cursor: query_start={query_start}, T={wc.n_tokens}")
    if oracle.d_model != wc.tree.config.d_model:
        raise ValueError(f"oracle d_model {oracle.d_model} != tree d_model {wc.tree.config.d_model}")
    base, variants = counterfactual_contexts(wc, n_tail)
    deep = lookahead_contexts(wc, n_tail) if lookahead else []
    nll = np.asarray(oracle.nll([base, *(v for _, _, v in variants), *(v for _, v in deep)], query_ids, query_start),
                     dtype=np.float64)
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError(f"oracle returned non-finite NLL {nll[~np.isfinite(nll)][:4]}")
    b = wc.block_size
    n = len(wc)
    gain = np.zeros(n)
    cost = np.zeros(n)
    for (kind, slot, _), value in zip(variants, nll[1 : 1 + len(variants)], strict=True):
        if kind == "expand":
            gain[slot] = max(0.0, nll[0] - value)
        else:
            cost[slot : slot + b] = max(0.0, value - nll[0])
    for (slot, _), value in zip(deep, nll[1 + len(variants) :], strict=True):
        gain[slot] = max(gain[slot], nll[0] - value)
    target = np.where(base.can_expand, gain, 0.0) - np.where(base.can_collapse, cost, 0.0)
    return {
        "embeddings": base.embeddings.astype(np.float32),
        "levels": base.levels,
        "node_index": base.node_index,
        "span_start": base.span_start,
        "span_width": base.span_width,
        "distance_to_cursor": base.distance_to_cursor,
        "position_ids": base.position_ids,
        "can_expand": base.can_expand,
        "can_collapse": base.can_collapse,
        "group_id": base.group_id,
        "expand_cost": base.expand_cost,
        "collapse_refund": base.collapse_refund,
        "expand_gain": gain.astype(np.float32),
        "collapse_cost": cost.astype(np.float32),
        "target_utilities": target.astype(np.float32),
        "action_mask": base.can_expand | base.can_collapse,
        "tail_gists": base.tail_gists.astype(np.float32),
        "tail_levels": base.tail_levels,
        "tail_mask": base.tail_mask,
        "n_tokens": np.int64(wc.n_tokens),
        "baseline_nll": np.float32(nll[0]),
        "doc_id": np.int64(doc_id),
    }


# ----------------------------------------------------------------------------- trace generation
@dataclass
class TraceArgs:
    """Generate labelled counterfactual traces (synthetic world) into a trace directory."""

    out: str = "runs/traces"
    """Output directory (with --shard i/n and n > 1: OUT/part-i-of-n)."""
    n_docs: int = 40
    """Documents to stream (doc ids 0..n_docs-1)."""
    first_doc: int = 0
    """First document id (held-out sets use a disjoint range)."""
    snapshot_every: int = 1
    """Label one snapshot every this many refocus steps."""
    seed: int = 0
    """Run seed: documents and behaviour derive from (seed, doc id)."""
    shard: str = "0/1"
    """i/n: this process takes the documents with doc_id % n == i."""
    shard_size: int = 256
    """Snapshots per safetensors shard."""
    behaviour_scale: float = 1.0
    """Std of the random scores that move the focus between snapshots (diverse contexts)."""
    progress: bool = True
    """Show a progress bar."""
    lm: str = "smollm2"
    """With --world.env lm: 'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    world: WorldConfig = field(default_factory=WorldConfig)


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/n, got {shard!r}") from err
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {shard!r}")
    return i, n


def generate_traces(args: TraceArgs, lm: tuple | None = None) -> Path:
    """Stream documents, label snapshots, write shards (resuming a crashed run); returns the directory.
    ``lm``: an already loaded (model, tokenizer) for ``--world.env lm`` (else ``args.lm`` is loaded)."""
    i, n = parse_shard(args.shard)
    out = Path(args.out) if n == 1 else Path(args.out) / f"part-{i}-of-{n}"
    w = args.world
    oracle_meta: dict = {"kind": "synthetic"}
    if w.env == "lm":  # real text, real LM; the tree takes the LM's width and its gister (GistNet or means)
        from gistnet.gister import resolve_gister
        from sim.lm import load_lm
        from sim.lm_oracle import LMOracle

        model, tokenizer = lm if lm is not None else load_lm(args.lm)
        lm_oracle = LMOracle(model)
        w = replace(w, tree=replace(w.tree, d_model=lm_oracle.d_model))
        gister, gister_name = resolve_gister(w.gister, model, w.tree.block_size)
        oracle_meta = {"kind": "lm", "lm": args.lm, "model": type(model).__name__, "gister": gister_name}
    meta = {"d_model": w.tree.d_model, "n_tail": w.n_tail, "block_size": w.tree.block_size,
            "max_level": w.tree.max_level, "world": to_dict(w), "seed": args.seed, "oracle": oracle_meta,
            "docs": [args.first_doc, args.first_doc + args.n_docs], "shard": args.shard,
            "snapshot_every": args.snapshot_every, "behaviour_scale": args.behaviour_scale}
    writer = TraceWriter(out, meta, shard_size=args.shard_size)
    skip, seen = writer.n_done, 0
    docs = [d for d in range(args.first_doc, args.first_doc + args.n_docs) if d % n == i]
    for doc_id in tqdm(docs, desc=f"label {out.name}", disable=not args.progress):
        if w.env == "lm":
            ep = lm_episode(w, doc_id, args.seed, lm_oracle, tokenizer, gister)
        else:
            ep, _ = synthetic_episode(w, doc_id, args.seed)
        rng = np.random.default_rng([args.seed, doc_id, 1])
        step = 0
        while ep.n_doc_tokens - ep.wc.n_tokens > 0:
            ep.advance()
            if not ep.can_query():
                break
            if step % args.snapshot_every == 0:
                if seen >= skip:  # resumed runs re-stream, but do not re-label, what is on disk
                    ids, start = ep.query()
                    writer.add(label_snapshot(ep.wc, ep.oracle, ids, start, w.n_tail, doc_id))
                seen += 1
            ep.refocus(rng.normal(scale=args.behaviour_scale, size=len(ep.wc)))
            step += 1
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(TraceArgs, argv)
    try:
        out = generate_traces(args)
    except (ValueError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {len(TraceReader(out))} snapshots to {out}")


if __name__ == "__main__":
    main()
