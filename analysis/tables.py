"""Markdown tables from ``sim.evaluate`` run folders: ``python -m analysis.tables RUN...``
(a column may merge runs of the same tasks: ``NAME=RUN1+RUN2``, and ``RUN#SUFFIX`` renames that
run's policies, e.g. an ablation's ``lensnet``). ``--seeds ROW=P1,P2,...`` adds a row pooling
policies that are training seeds of one scorer (``sim.evaluate --lensnets``): the mean exact match
over the seeds, each seed's count, the mean answer NLL and focus recall.

One row per policy, one column group per run (its folder name and read mode, DESIGN §11: a run
without one predates the faithful mode and read the whole stream, 'full-read, pre-faithful'; the
runs merged into one column must share their mode): exact match with its 95 % bootstrap interval,
answer NLL, focus recall, LensNet's cost per round against one LM forward at W_max (and, in the
faithful mode, its re-read of the refocused context) and, where the run has the oracle, NGR.
``--edges`` prints a second table: exact match at the edges of the needle depth range and in its
interior (``by_depth``). Reads each run's ``results.json`` only, so a table in the docs is rebuilt
from the committed folders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(r: dict) -> str:
    n = r["n"]
    if not n:  # e.g. full context on streams past the LM's window (``skipped_why``)
        return f"cannot run ({r.get('skipped', 0)} tasks past the LM's window)"
    em = f"{round(r['exact_match'] * n)}/{n}"
    if r.get("skipped"):
        em += f" ({r['skipped']} past the window skipped)"
    ci = r.get("exact_match_ci95")
    if ci:
        em += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    out = f"{em}, {r['answer_nll']:.3f}"
    if r.get("focus_recall") is not None:
        out += f", {r['focus_recall']:.2f}"
    if r.get("cost_vs_lm_forward") is not None:
        out += f", cost {r['cost_vs_lm_forward']:.3f}"
        if r.get("reread_vs_lm_forward"):
            out += f" + re-read {r['reread_vs_lm_forward']:.2f}"
    if r.get("ngr") is not None:
        lo, hi = r.get("ngr_ci95") or (float("nan"), float("nan"))
        out += f", NGR {r['ngr']:.2f} [{lo:.2f}, {hi:.2f}]"
    elif r.get("ngr_full") is not None:  # no oracle in the run: the gap to full context
        lo, hi = r.get("ngr_full_ci95") or (float("nan"), float("nan"))
        out += f", NGR vs full {r['ngr_full']:.2f} [{lo:.2f}, {hi:.2f}]"
    return out


def _edge_cell(r: dict) -> str:
    """Exact match at the depth range's edges and in its interior (``by_depth``)."""
    parts = r.get("by_depth")
    if not parts:
        return "–" if r["n"] else "cannot run"
    return " / ".join(
        "–" if p["exact_match"] is None else f"{round(p['exact_match'] * p['n'])}/{p['n']}"
        for p in (parts["edge"], parts["interior"])
    )


def read_mode(config: dict) -> str:
    """A run's read mode; runs from before the faithful mode read the whole stream (with block 0
    as the sink and the newest 32 tokens as the query)."""
    return config.get("read_mode", "full-read, pre-faithful")


def _header(name: str, res: dict) -> str:
    return f"{name} ({read_mode(res['configs'][0])})"


def load_merged(dirs: str) -> dict:
    """Runs of the same tasks side by side, ``RUN1+RUN2...`` (``RUN#SUFFIX``: that run's policies
    renamed name+SUFFIX): ``policies`` merged (a later run's policy replaces an earlier one of the
    same name) and ``configs``, each run's config in order."""
    merged: dict = {"policies": {}, "configs": []}
    for d in dirs.split("+"):
        d, _, suffix = d.partition("#")
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{dirs}: no {path} (a sim.evaluate run folder was expected)")
        res = json.loads(path.read_text())
        config = res.get("config", {})
        if merged["configs"] and read_mode(config) != read_mode(merged["configs"][0]):
            raise SystemExit(
                f"{dirs}: {d} read the LM in mode {read_mode(config)!r}, the column's first run "
                f"in {read_mode(merged['configs'][0])!r}: put them in columns of their own"
            )
        merged["configs"].append(config)
        merged["policies"].update({k + suffix: v for k, v in res["policies"].items()})
    return merged


def _load(spec: str | Path) -> tuple[str, dict]:
    """A column: a run folder (named after it), or ``NAME=RUN1+RUN2...``: the policies of several
    runs of the same tasks side by side in one column (e.g. the baselines' run and LensNet's)."""
    spec = str(spec)
    name, _, dirs = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
    return name, load_merged(dirs)


def _seed_cell(rs: list[dict]) -> str:
    """Several training seeds of one scorer on the same tasks: mean exact match (each seed's
    count), mean answer NLL, mean focus recall."""
    n = rs[0]["n"]
    counts = [round(r["exact_match"] * n) for r in rs]
    out = (f"{sum(counts) / len(rs) / n:.2f} ({', '.join(map(str, counts))} /{n}), "
           f"{sum(r['answer_nll'] for r in rs) / len(rs):.3f}")
    recall = [r["focus_recall"] for r in rs if r.get("focus_recall") is not None]
    if recall:
        out += f", {sum(recall) / len(recall):.2f}"
    return out


def table(
    run_dirs: list[str | Path], seeds: dict[str, list[str]] | None = None, edges: bool = False
) -> str:
    """The markdown table of ``run_dirs`` (policies in the first run's order, then any others),
    then a row per ``seeds`` entry (row name -> the policies that are its training seeds).
    ``edges``: each cell is exact match at the depth range's edges / in its interior instead."""
    runs = [_load(d) for d in run_dirs]
    names: list[str] = []
    for _, res in runs:
        names += [n for n in res["policies"] if n not in names]
    head = "| policy | " + " | ".join(_header(name, res) for name, res in runs) + " |"
    rows = [head, "| --- |" + " --- |" * len(runs)]
    show = _edge_cell if edges else _cell
    for policy in names:
        cells = [show(res["policies"][policy]) if policy in res["policies"] else "–"
                 for _, res in runs]
        rows.append(f"| {policy} | " + " | ".join(cells) + " |")
    for row, members in ({} if edges else seeds or {}).items():
        cells = []
        for _, res in runs:
            found = [res["policies"][m] for m in members if m in res["policies"]]
            cells.append(_seed_cell(found) if len(found) == len(members) else "–")
        rows.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _seed_spec(text: str) -> tuple[str, list[str]]:
    row, sep, members = text.partition("=")
    names = [m for m in members.split(",") if m]
    if not sep or not row or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROW=POLICY1,POLICY2,...")
    return row, names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.tables", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN",
                    help="a sim.evaluate run folder, NAME=RUN1+RUN2 or RUN#SUFFIX")
    ap.add_argument("--seeds", type=_seed_spec, action="append", default=[],
                    metavar="ROW=P1,P2,...", help="a row pooling the training seeds of one scorer")
    ap.add_argument("--edges", action="store_true",
                    help="exact match at the needle depth's edges / in its interior instead")
    args = ap.parse_args(argv)
    if args.edges:
        print("cells: exact match with the needle at depth < 0.1 or > 0.9 (edges) / in between")
    else:
        print("cells: exact match [95 % CI], answer NLL, focus recall (, LensNet's cost per round "
              "/ one LM forward at W_max) (, NGR [95 % CI]); seed rows: mean exact match (each "
              "seed's count), mean answer NLL, mean focus recall")
    print(table(args.runs, dict(args.seeds), args.edges))


if __name__ == "__main__":
    main()
