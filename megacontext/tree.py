"""The MegaContext tree (DESIGN.md §1): the whole history, append-only, in contiguous arrays.

Level 0 holds one entry per token (its id and embedding); a node of level l >= 1 is the gist of
its ``b`` children one level down and exists only once all of them exist. Each level is one
growable ``[n, d_model]`` array (capacity doubling), so ingesting 10^6 tokens costs a handful of
vectorised copies, not a Python object per token. Gists are computed by a pluggable *gister*
(``children [n, b, d] -> [n, d]``) the moment a block completes; mean pooling is the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A gister maps the children of n completed nodes to their gists: (children [n, b, d], level) -> [n,
# d]
Gister = Callable[[np.ndarray, int], np.ndarray]


def mean_gister(children: np.ndarray, level: int) -> np.ndarray:
    """Mean pooling of the children (baseline only: catastrophic for a real LM, DESIGN §7)."""
    return children.mean(axis=1)


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another."""


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the MegaContext tree."""

    block_size: int = 32
    """b: children per node (tokens per L1 gist, L1 gists per L2 gist)."""
    max_level: int = 2
    """Highest gist level (L2 = b**2 tokens by default)."""
    d_model: int = 64
    """Width of every node embedding (the LM's hidden size for a real LM)."""

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2, got {self.block_size}")
        if self.max_level < 1:
            raise ConfigError(f"max_level must be >= 1, got {self.max_level}")
        if self.d_model < 1:
            raise ConfigError(f"d_model must be >= 1, got {self.d_model}")

    def span(self, level: int) -> int:
        """Number of tokens covered by one node of ``level``."""
        return self.block_size**level


class _GrowableRows:
    """An append-only ``[n, *row_shape]`` array with amortised O(1) appends."""

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype, capacity: int = 256) -> None:
        self._data = np.empty((capacity, *row_shape), dtype=dtype)
        self.n = 0

    def extend(self, rows: np.ndarray) -> None:
        m = rows.shape[0]
        if self.n + m > self._data.shape[0]:
            new_cap = max(2 * self._data.shape[0], self.n + m)
            grown = np.empty((new_cap, *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self.n] = self._data[: self.n]
            self._data = grown
        self._data[self.n : self.n + m] = rows
        self.n += m

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.n]


class MegaContextTree:
    """Append-only tree of tokens (L0) and gists (L1..max_level); nodes addressed by (level, index).
    """

    def __init__(
        self,
        config: TreeConfig,
        gister: Gister = mean_gister,
        dtype: np.dtype | type = np.float32,
        reserve_tokens: int = 0,
    ) -> None:
        """``reserve_tokens``: expected document length; pre-sizing the arrays avoids the copies
        (and the transient 2x memory) of capacity doubling."""
        self.config = config
        self.gister = gister
        self.dtype = np.dtype(dtype)
        b = config.block_size
        self._token_ids = _GrowableRows((), np.dtype(np.int64), max(reserve_tokens, 256))
        self._levels = [
            _GrowableRows((config.d_model,), self.dtype, max(reserve_tokens // b**lv, 256))
            for lv in range(config.max_level + 1)
        ]

    # ----------------------------------------------------------------------------------- sizes
    @property
    def n_tokens(self) -> int:
        """T: tokens ingested so far."""
        return self._token_ids.n

    def n_nodes(self, level: int) -> int:
        """Number of complete nodes at ``level``."""
        self._check_level(level)
        return self._levels[level].n

    def nbytes(self) -> int:
        """Bytes the tree's arrays hold (token ids and every level's embeddings, as allocated):
        linear in the tokens ingested."""
        return self._token_ids._data.nbytes + sum(rows._data.nbytes for rows in self._levels)

    # ---------------------------------------------------------------------------------- ingest
    def ingest(self, token_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Append tokens (ids ``[n]``, embeddings ``[n, d_model]``) and gist every block they
        complete."""
        token_ids = np.asarray(token_ids)
        embeddings = np.asarray(embeddings)
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {token_ids.shape}")
        if embeddings.shape != (token_ids.shape[0], self.config.d_model):
            raise ValueError(
                f"embeddings must have shape ({token_ids.shape[0]}, {self.config.d_model}), "
                f"got {embeddings.shape}"
            )
        if not np.all(np.isfinite(embeddings)):
            raise ValueError("embeddings contain NaN or inf")
        self._token_ids.extend(token_ids.astype(np.int64, copy=False))
        self._levels[0].extend(embeddings.astype(self.dtype, copy=False))
        b = self.config.block_size
        for level in range(1, self.config.max_level + 1):
            done, below = self._levels[level].n, self._levels[level - 1].n
            new = below // b - done
            if new == 0:
                break  # nothing completed here, so nothing above either
            children = self._levels[level - 1].view[done * b : (done + new) * b]
            children = children.reshape(new, b, self.config.d_model)
            gists = np.asarray(self.gister(children, level), dtype=self.dtype)
            if gists.shape != (new, self.config.d_model):
                raise ValueError(
                    f"gister returned shape {gists.shape}, expected ({new}, {self.config.d_model})"
                )
            self._levels[level].extend(gists)

    # --------------------------------------------------------------------------------- lookups
    def exists(self, level: int, index: int) -> bool:
        """Whether node (level, index) is complete."""
        return 0 <= level <= self.config.max_level and 0 <= index < self._levels[level].n

    def span(self, level: int, index: int) -> tuple[int, int]:
        """Token span ``[start, end)`` of node (level, index)."""
        w = self.config.span(level)
        return index * w, (index + 1) * w

    def parent(self, level: int, index: int) -> tuple[int, int]:
        """The (level, index) of the node's parent (which may not exist yet)."""
        if level >= self.config.max_level:
            raise ValueError(f"level {level} has no parent (max_level {self.config.max_level})")
        return level + 1, index // self.config.block_size

    def children(self, level: int, index: int) -> tuple[int, np.ndarray]:
        """Level and indices of the b children of node (level, index)."""
        if level < 1:
            raise ValueError("L0 nodes have no children")
        b = self.config.block_size
        return level - 1, np.arange(index * b, (index + 1) * b)

    def embeddings(self, level: int, indices: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of nodes at ``level`` (all complete nodes when ``indices`` is None)."""
        self._check_level(level)
        view = self._levels[level].view
        return view if indices is None else view[indices]

    def token_ids(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Token ids of ``[start, end)``."""
        return self._token_ids.view[start:end]

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.config.max_level:
            raise ValueError(f"level must be in [0, {self.config.max_level}], got {level}")
