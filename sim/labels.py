"""Labelled traces over documents (DESIGN.md §3): ``python -m sim.labels`` streams documents
(synthetic, or real text with ``--world.env lm``), labels every snapshot with
``megacontext.labels.label_snapshot`` and writes traces (``--shard i/n`` splits the documents
between processes; a rerun resumes after the last complete shard).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from megacontext.cli import run_cli, to_dict
from megacontext.labels import label_snapshot
from megacontext.traces import TraceReader, TraceWriter, parse_shard
from sim.policy import FocusView
from sim.streamworld.world import WorldConfig, lm_episode, synthetic_episode


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
    """Std of the random scores that move the focus between snapshots (diverse contexts); with a
    behaviour scorer (``generate_traces``' ``behaviour``), the std of the noise added to its
    scores."""
    progress: bool = True
    """Show a progress bar."""
    lm: str = "smollm2"
    """With --world.env lm: 'smollm2', 'tiny' (random-init test LM) or a local model folder."""
    world: WorldConfig = field(default_factory=WorldConfig)


class Behaviour(Protocol):
    """A scorer that moves the focus while traces are labelled (a ``sim.policy.FocusPolicy`` is
    one)."""

    name: str

    def scores(self, view: FocusView) -> np.ndarray: ...


def generate_traces(
    args: TraceArgs, lm: tuple | None = None, behaviour: Behaviour | None = None
) -> Path:
    """Stream documents, label snapshots, write shards (resuming a crashed run); returns the
    directory.
    ``lm``: an already loaded (model, tokenizer) for ``--world.env lm`` (else ``args.lm`` is
    loaded). ``behaviour``: what moves the focus between snapshots (a ``Behaviour``: a policy's
    scores of the step plus noise of std ``args.behaviour_scale``, so the traces hold the contexts
    that policy visits, e.g. a trained LensNet's for a DAgger round); by default random scores of
    std ``behaviour_scale`` per entry."""
    i, n = parse_shard(args.shard)
    out = Path(args.out) if n == 1 else Path(args.out) / f"part-{i}-of-{n}"
    w = args.world
    oracle_meta: dict = {"kind": "synthetic"}
    if (
        w.env == "lm"
    ):  # real text, real LM; the tree takes the LM's width and its gister (GistNet or means)
        from gistnet.gister import resolve_gister
        from megacontext.lm import load_lm
        from megacontext.lm_oracle import LMOracle

        model, tokenizer = lm if lm is not None else load_lm(args.lm)
        lm_oracle = LMOracle(model)
        w = replace(w, tree=replace(w.tree, d_model=lm_oracle.d_model))
        gister, gister_name = resolve_gister(w.gister, model, w.tree.block_size)
        oracle_meta = {
            "kind": "lm",
            "lm": args.lm,
            "model": type(model).__name__,
            "gister": gister_name,
        }
    meta = {
        "d_model": w.tree.d_model,
        "n_tail": w.n_tail_gists,
        "block_size": w.tree.block_size,
        "max_level": w.tree.max_level,
        "world": to_dict(w),
        "seed": args.seed,
        "oracle": oracle_meta,
        "docs": [args.first_doc, args.first_doc + args.n_docs],
        "shard": args.shard,
        "snapshot_every": args.snapshot_every,
        "behaviour_scale": args.behaviour_scale,
    }
    if behaviour is not None:  # (random behaviour's traces keep the meta they always had)
        meta["behaviour"] = behaviour.name
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
                    writer.add(label_snapshot(ep.wc, ep.oracle, ids, start, w.n_tail_gists, doc_id))
                seen += 1
            noise = rng.normal(scale=args.behaviour_scale, size=len(ep.wc))
            ep.refocus(noise if behaviour is None else behaviour.scores(ep.view()) + noise)
            step += 1
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    _, out = run_cli(TraceArgs, generate_traces, argv)
    print(f"wrote {len(TraceReader(out))} snapshots to {out}")


if __name__ == "__main__":
    main()
