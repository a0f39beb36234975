"""Shared pieces of the benchmarks: the machine/versions record and the JSON writer."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def environment() -> dict:
    """Machine and library versions, recorded in every results file."""
    import numpy as np
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _command() -> str:
    """The command line as it would be typed from the project's root (``python -m benchmarks.X``
    for a benchmark script), naming no machine's folders."""
    script = Path(sys.argv[0]).resolve()
    here = Path(__file__).resolve().parent
    inside = script.parent == here
    head = f"python -m benchmarks.{script.stem}" if inside else Path(sys.argv[0]).name
    return " ".join([head, *sys.argv[1:]])


def write_results(name: str, config: dict, results: dict, out_dir: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command, config, machine and results."""
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {
        "command": _command(),
        "config": config,
        "environment": environment(),
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
