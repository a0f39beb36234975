"""Is a trained synthetic LensNet's collapse price off? Its collapse scores scaled by c (issue 31).

    python -m sim.run --seed 5 --out runs/synth-seed5 --no-plots
    python -m benchmarks.collapse_price runs/synth-seed5 [--factors 0.1 0.25 0.5 1 1.5 2 3]

A LensNet's signed scores price each collapse (negative: the NLL its group would cost) against
each expand; the allocator swaps when an expand is worth more than the collapse that pays for it.
If the collapse prices were too high, LensNet would swap too rarely. This multiplies the
calibrated LensNet's negative scores by each factor c (c < 1: cheaper collapses, more swaps) and
runs the stream policy at each budget, on the run's calibration documents (validation: what a
per-kind calibration would fit on) and on its held-out documents, beside recency, the oracle and
the ``cue`` reference (NGR against recency and the oracle of the same documents). ``--mixed`` adds
the two halves swapped: LensNet's expand values with ``cue``'s collapse prices, and the reverse,
to say which side holds the gap to the reference; ``--levels 1 2`` LensNet with ``cue``'s scores
on one tree level's entries (which level holds it). Writes
``benchmarks/results/collapse_price.json``. One trained checkpoint: a diagnostic of that seed, not
a figure over seeds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import write_results


def _policy_classes(model):
    """(Priced, Mixed): the calibrated ``model`` with its collapse prices times c, and the two
    halves of it and ``cue`` swapped."""
    from sim.policies import CueReference, LensNetPolicy

    class Priced(LensNetPolicy):
        """The calibrated LensNet with its collapse prices (negative scores) times ``c``."""

        def __init__(self, c: float) -> None:
            super().__init__(model, "cpu", name=f"c={c:g}")
            self.c = c

        def scores(self, view):
            u = super().scores(view)
            return np.where(u < 0, u * self.c, u)

    class Mixed(LensNetPolicy):
        """Expand values from one scorer, collapse prices from the other: where the expand side's
        score is positive it stands, elsewhere the collapse side's negative part."""

        def __init__(self, expand_from: str) -> None:
            other = "cue" if expand_from == "lensnet" else "lensnet"
            super().__init__(model, "cpu", name=f"expand {expand_from} / collapse {other}")
            self.expand_from = expand_from

        def scores(self, view):
            lens, cue = super().scores(view), CueReference().scores(view)
            up, down = (lens, cue) if self.expand_from == "lensnet" else (cue, lens)
            return np.where(up > 0, up, np.minimum(down, 0.0))

    class ByLevel(LensNetPolicy):
        """LensNet's scores, with ``cue``'s on the entries at one tree level (both directions):
        how much of the gap that level's scores hold."""

        def __init__(self, level: int) -> None:
            super().__init__(model, "cpu", name=f"cue on L{level}")
            self.level = level

        def scores(self, view):
            lens, cue = super().scores(view), CueReference().scores(view)
            return np.where(view.wc.levels == self.level, cue, lens)

    return Priced, Mixed, ByLevel


def main(argv: list[str] | None = None) -> dict:
    """Each factor's NGR, expands and swaps per step at each budget on both document sets."""
    import torch

    from lensnet.train import load_model, split_indices
    from megacontext.cli import from_dict
    from megacontext.traces import TraceReader
    from sim.policies import build_policy
    from sim.policy import PolicyContext
    from sim.run import RunArgs
    from sim.streamworld.world import HELD_OUT_FIRST_DOC, evaluate_policy, nll_gap_recovered

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a sim.run folder (synthetic world) with its best.pt")
    ap.add_argument("--factors", type=float, nargs="+",
                    default=[0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[192, 256])
    ap.add_argument("--mixed", action="store_true",
                    help="also the two mixes: LensNet's expand values with cue's collapse prices, "
                    "and the reverse (which side holds the gap to cue)")
    ap.add_argument("--levels", type=int, nargs="*", default=[],
                    help="also LensNet with cue's scores on the entries of each of these tree "
                    "levels (which level's scores hold the gap)")
    ap.add_argument("--out-dir", default=None,
                    help="where the JSON goes (default: benchmarks/results)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    study = from_dict(RunArgs, json.loads((run / "config.json").read_text()))
    if study.env != "synthetic":
        raise SystemExit(f"error: {run} is an --env {study.env} run; this reads synthetic runs")
    world = replace(study.world, env=study.env)
    model = load_model(run / "best.pt")
    reader = TraceReader(run / "traces" / "train", require_complete=True)
    _, val_idx = split_indices(reader.snapshots["doc_id"], 0.1, study.seed)  # as sim.run splits
    docs = {
        "validation": sorted({int(d) for d in reader.snapshots["doc_id"][val_idx]})[
            : study.calibration_docs
        ],
        "heldout": list(range(HELD_OUT_FIRST_DOC, HELD_OUT_FIRST_DOC + study.eval_docs)),
    }

    Priced, Mixed, ByLevel = _policy_classes(model)
    results: dict = {}
    with torch.no_grad():  # a context: the caller's grad mode is left as it was
        for name, ids in docs.items():
            for budget in args.budgets:
                wb = replace(world, context=replace(world.context, w_max=budget))
                ctx = PolicyContext(seed=study.seed, lensnet=model, device="cpu")
                runs = {
                    p: evaluate_policy(build_policy(p, ctx, "stream"), wb, ids, study.seed, False)
                    for p in ("recency", "oracle", "cue")
                }
                for c in args.factors:
                    runs[f"c={c:g}"] = evaluate_policy(Priced(c), wb, ids, study.seed, False)
                for side in ("lensnet", "cue") if args.mixed else ():
                    p = Mixed(side)
                    runs[p.name] = evaluate_policy(p, wb, ids, study.seed, False)
                for level in args.levels:
                    p = ByLevel(level)
                    runs[p.name] = evaluate_policy(p, wb, ids, study.seed, False)
                ngr = nll_gap_recovered(runs)
                results.setdefault(name, {})[str(budget)] = {
                    p: {"ngr": ngr[p], "nll": r["nll"], "expands_per_step": r["expands_per_step"],
                        "swap_rate": r.get("swap_rate")}
                    for p, r in runs.items()
                }
                row = "  ".join(f"{p} {ngr[p]:.3f}" for p in runs
                                if p.startswith(("c=", "expand", "cue on")))
                print(f"{name} W_max {budget}: cue {ngr['cue']:.3f}  {row}", flush=True)
    config = {"run": str(run), "seed": study.seed, "factors": args.factors, "mixed": args.mixed,
              "levels": args.levels,
              "budgets": args.budgets, "docs": docs, "score_scale": model.score_scale}
    write_results("collapse_price", config, results, args.out_dir)
    return results


if __name__ == "__main__":
    main()
