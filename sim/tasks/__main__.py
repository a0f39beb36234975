"""``python -m sim.tasks``: write a JSONL task file from the command line (``sim.tasks.main``;
``--help`` lists the options)."""

from __future__ import annotations

import sys

from sim.tasks import main

if __name__ == "__main__":
    if sys.argv[0].endswith("__main__.py"):  # name the command in usage lines (as unittest does)
        sys.argv[0] = "python -m sim.tasks"
    main()
