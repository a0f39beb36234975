"""Markdown tables from ``sim.evaluate`` run folders: ``python -m analysis.tables RUN...``
(a column may merge runs of the same tasks: ``NAME=RUN1+RUN2``, and ``RUN#SUFFIX`` renames that
run's policies, e.g. an ablation's ``lensnet``).

One row per policy, one column group per run (its folder name): exact match with its 95 %
bootstrap interval, answer NLL, focus recall and, where the run has the oracle, NGR. Reads each
run's ``results.json`` only, so a table in the docs is rebuilt from the committed folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(r: dict) -> str:
    n = r["n"]
    em = f"{round(r['exact_match'] * n)}/{n}"
    ci = r.get("exact_match_ci95")
    if ci:
        em += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    out = f"{em}, {r['answer_nll']:.3f}"
    if r.get("focus_recall") is not None:
        out += f", {r['focus_recall']:.2f}"
    if r.get("ngr") is not None:
        lo, hi = r.get("ngr_ci95") or (float("nan"), float("nan"))
        out += f", NGR {r['ngr']:.2f} [{lo:.2f}, {hi:.2f}]"
    return out


def _load(spec: str | Path) -> tuple[str, dict]:
    """A column: a run folder (named after it), or ``NAME=RUN1+RUN2...``: the policies of several
    runs of the same tasks side by side in one column (e.g. the baselines' run and LensNet's)."""
    spec = str(spec)
    name, _, dirs = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
    merged: dict = {"policies": {}}
    for d in dirs.split("+"):
        d, _, suffix = d.partition("#")  # RUN#SUFFIX: that run's policies renamed name+SUFFIX
        res = json.loads((Path(d) / "results.json").read_text())
        merged["policies"].update({k + suffix: v for k, v in res["policies"].items()})
    return name, merged


def table(run_dirs: list[str | Path]) -> str:
    """The markdown table of ``run_dirs`` (policies in the first run's order, then any others)."""
    runs = [_load(d) for d in run_dirs]
    names: list[str] = []
    for _, res in runs:
        names += [n for n in res["policies"] if n not in names]
    head = "| policy | " + " | ".join(name for name, _ in runs) + " |"
    rows = [head, "| --- |" + " --- |" * len(runs)]
    for policy in names:
        cells = [_cell(res["policies"][policy]) if policy in res["policies"] else "–"
                 for _, res in runs]
        rows.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m analysis.tables RUN_DIR...")
    print("cells: exact match [95 % CI], answer NLL, focus recall (, NGR [95 % CI])")
    print(table(argv))


if __name__ == "__main__":
    main()
