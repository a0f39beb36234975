"""The one oracle interface (DESIGN.md §3): NLL of the next H tokens after each of a batch of
contexts.

Implemented by ``sim.streamworld.synthetic.SyntheticOracle`` (exact, milliseconds) and
``megacontext.lm_oracle.LMOracle``
(a frozen transformers causal LM). Labelling, the environment and evaluation take any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from megacontext.working_context import ContextArrays


class NLLOracle(Protocol):
    """Anything that scores contexts: mean next-token NLL of ``query_ids`` after each context."""

    d_model: int

    def nll(
        self, contexts: Sequence[ContextArrays], query_ids: np.ndarray, query_start: int
    ) -> np.ndarray:
        """(len(contexts),) mean NLL; ``query_start`` = the index of the first query token (= T)."""
        ...
