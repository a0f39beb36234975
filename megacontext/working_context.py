"""The working context (DESIGN.md §2): the fixed-budget sequence of tree nodes the LM reads.

Entries are stored as two parallel int arrays (``levels``, ``indices``) naming tree nodes; spans,
positions and legality are derived from them, never stored twice. ``expand``/``collapse`` are the
only mutations besides ``append_tokens`` (the cursor), and each keeps every invariant of §2;
``check_invariants`` re-derives all of them from scratch and raises ``InvariantViolation`` naming
the one that broke. ``arrays`` returns what LensNet, the LM oracle and the environment consume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from megacontext.tree import ConfigError, MegaContextTree

PositionMode = Literal["slot", "centre"]


class InvariantViolation(RuntimeError):
    """A working-context invariant of DESIGN §2 does not hold; ``invariant`` names which."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"invariant '{invariant}' violated: {detail}")
        self.invariant = invariant


class IllegalAction(ValueError):
    """An expand or collapse that DESIGN §2 forbids (L0 expand, tail collapse, partial group...)."""


class BudgetExhausted(RuntimeError):
    """No legal collapse can bring the working context back within W_max."""


@dataclass(frozen=True)
class ContextConfig:
    """Budget and layout of the working context."""

    w_max: int = 512
    """W_max: maximum number of entries (each costs one slot)."""
    tail_tokens: int = 128
    """R: the last R tokens always stand at L0 and never collapse."""
    position_mode: PositionMode = "slot"
    """'slot': position = slot index; 'centre': L0 at its token index, a gist at its span centre."""

    def __post_init__(self) -> None:
        if self.tail_tokens < 0:
            raise ConfigError(f"tail_tokens must be >= 0, got {self.tail_tokens}")
        if self.w_max < 1:
            raise ConfigError(f"w_max must be >= 1, got {self.w_max}")
        if self.position_mode not in ("slot", "centre"):
            raise ConfigError(
                f"position_mode must be 'slot' or 'centre', got {self.position_mode!r}"
            )


def min_slots(n_tokens: int, block_size: int, max_level: int, tail_tokens: int) -> int:
    """Fewest entries that can cover ``n_tokens`` legally: the coarsest cover with an L0 tail."""
    coarse_end = max(n_tokens - tail_tokens, 0)  # tokens that may stand coarse
    count, covered = 0, 0
    for level in range(max_level, 0, -1):
        w = block_size**level
        n = coarse_end // w - covered // w  # whole level-`level` nodes after what is covered
        count += n
        covered += n * w
    return count + (n_tokens - covered)


@dataclass
class ContextArrays:
    """Per-entry arrays (length N) and tail gists, as LensNet / the LM / the env consume them."""

    embeddings: np.ndarray  # (N, d) float
    position_ids: np.ndarray  # (N,) int64, strictly increasing
    levels: np.ndarray  # (N,) int64
    node_index: np.ndarray  # (N,) int64, index of the node within its level
    span_start: np.ndarray  # (N,) int64
    span_width: np.ndarray  # (N,) int64
    distance_to_cursor: np.ndarray  # (N,) int64, T - span end
    can_expand: np.ndarray  # (N,) bool
    can_collapse: np.ndarray  # (N,) bool, member of a legal sibling group
    group_id: np.ndarray  # (N,) int64, slot of the group's first member, -1 if none
    expand_cost: np.ndarray  # (N,) float, c+ = b - 1 for gists
    collapse_refund: np.ndarray  # (N,) float, c- = (b - 1) / b for members of legal groups
    tail_gists: np.ndarray  # (n_tail_gists, d) float, zero padded
    tail_levels: np.ndarray  # (n_tail_gists,) int64, -1 on padding
    tail_mask: np.ndarray  # (n_tail_gists,) bool, True = real gist
    n_tokens: int


class WorkingContext:
    """An ordered cover of ``[0, T)`` by tree nodes, within ``W_max`` slots, with an L0 recency
    tail."""

    def __init__(self, tree: MegaContextTree, config: ContextConfig) -> None:
        b, top = tree.config.block_size, tree.config.max_level
        floor = config.tail_tokens + (b - 1) * top + 1
        if config.w_max < floor:
            raise ConfigError(
                f"w_max={config.w_max} cannot hold the L0 tail ({config.tail_tokens}) plus a "
                "coarse cover "
                f"(up to {b - 1} nodes per level below the top, and one top-level gist): "
                f"need w_max >= tail_tokens + (b-1)*max_level + 1 = {floor}"
            )
        self.tree = tree
        self.config = config
        self.levels = np.zeros(0, dtype=np.int64)
        self.indices = np.zeros(0, dtype=np.int64)
        self.n_tokens = 0  # T: tokens covered (the cursor)

    def copy(self) -> WorkingContext:
        """An independent context over the same tree (entries copied; the tree is shared)."""
        other = WorkingContext.__new__(WorkingContext)
        other.tree, other.config, other.n_tokens = self.tree, self.config, self.n_tokens
        other.levels, other.indices = self.levels.copy(), self.indices.copy()
        return other

    # ---------------------------------------------------------------------- derived geometry
    def __len__(self) -> int:
        return int(self.levels.shape[0])

    @property
    def block_size(self) -> int:
        return self.tree.config.block_size

    @property
    def max_level(self) -> int:
        return self.tree.config.max_level

    @property
    def widths(self) -> np.ndarray:
        return self.block_size**self.levels

    @property
    def starts(self) -> np.ndarray:
        return self.indices * self.widths

    @property
    def ends(self) -> np.ndarray:
        return self.starts + self.widths

    @property
    def tail_start(self) -> int:
        """First token of the recency tail."""
        return max(self.n_tokens - self.config.tail_tokens, 0)

    def free_slots(self) -> int:
        return self.config.w_max - len(self)

    def find(self, level: int, index: int) -> int:
        """Slot of node (level, index), or -1 when it is not an entry."""
        start = index * self.block_size**level
        i = int(np.searchsorted(self.starts, start))
        if i < len(self) and self.levels[i] == level and self.indices[i] == index:
            return i
        return -1

    def can_expand(self) -> np.ndarray:
        """(N,) bool: gists (level >= 1) can expand; L0 never does."""
        return self.levels >= 1

    def group_starts(self) -> np.ndarray:
        """Slots that open a legal sibling group: b consecutive same-level siblings outside the
        tail."""
        b, n = self.block_size, len(self)
        if n < b:
            return np.zeros(0, dtype=np.int64)
        lv = sliding_window_view(self.levels, b)  # (n-b+1, b)
        ix = sliding_window_view(self.indices, b)
        first_lv, first_ix = lv[:, 0], ix[:, 0]
        ok = (first_lv < self.max_level) & (first_ix % b == 0)
        ok &= np.all(lv == first_lv[:, None], axis=1)
        ok &= np.all(ix == first_ix[:, None] + np.arange(b), axis=1)
        parent_end = (first_ix + b) * self.block_size**first_lv
        ok &= parent_end <= self.tail_start
        return np.flatnonzero(ok)

    def can_collapse(self) -> np.ndarray:
        """(N,) bool: the entry belongs to a legal sibling group (``group_ids`` >= 0)."""
        return self.group_ids() >= 0

    def group_ids(self) -> np.ndarray:
        """(N,) int64: slot of the first member of the entry's legal sibling group, -1 if none."""
        gid = np.full(len(self), -1, dtype=np.int64)
        for s in self.group_starts():  # groups are disjoint; at most N / b of them
            gid[s : s + self.block_size] = s
        return gid

    def position_ids(self, max_positions: int | None = None) -> np.ndarray:
        """Position ids given to the LM (DESIGN §2.5), strictly increasing."""
        if self.config.position_mode == "slot":
            return np.arange(len(self), dtype=np.int64)
        pos = self.starts + self.widths // 2
        if max_positions is not None and self.n_tokens > max_positions:
            raise ValueError(
                f"position_mode='centre' needs T <= max_positions, got T={self.n_tokens} > "
                f"{max_positions}; use position_mode='slot'"
            )
        return pos

    # ------------------------------------------------------------------------------ mutations
    def shrink_tail(self, tail_tokens: int) -> None:
        """Protect only the last ``tail_tokens`` tokens from now on (at most the current tail, so
        the tail is already at L0 and every invariant keeps holding): the tokens that leave the
        tail may now collapse. The task world's question time keeps only the question at L0
        (``TaskWorldConfig.question_tail``). Copies made before keep their tail."""
        if not 0 <= tail_tokens <= self.config.tail_tokens:
            raise ValueError(
                f"tail_tokens must lie in [0, {self.config.tail_tokens}] (the tail can only "
                f"shrink), got {tail_tokens}"
            )
        self.config = replace(self.config, tail_tokens=tail_tokens)

    def append_tokens(self, n: int) -> None:
        """Advance the cursor: the next ``n`` tokens (already in the tree) join at L0 at the end.

        Raises ``BudgetExhausted`` (and changes nothing) when even the coarsest legal cover of the
        new history would exceed W_max; otherwise ``FocusAllocator.enforce_budget`` can always
        restore the budget afterwards.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.n_tokens + n > self.tree.n_tokens:
            raise ValueError(
                f"cannot append {n} tokens: the tree holds {self.tree.n_tokens}, the context "
                f"already covers {self.n_tokens}"
            )
        need = min_slots(
            self.n_tokens + n, self.block_size, self.max_level, self.config.tail_tokens
        )
        if need > self.config.w_max:
            raise BudgetExhausted(
                f"T={self.n_tokens + n} tokens need at least {need} slots (coarsest cover with an "
                "L0 "
                f"tail of {self.config.tail_tokens}) > w_max={self.config.w_max}: raise w_max, "
                "shorten the "
                "tail, or add a level"
            )
        new = np.arange(self.n_tokens, self.n_tokens + n, dtype=np.int64)
        self.levels = np.concatenate([self.levels, np.zeros(n, dtype=np.int64)])
        self.indices = np.concatenate([self.indices, new])
        self.n_tokens += n

    def expand(self, level: int, index: int) -> int:
        """Replace gist (level, index) by its b children; returns the slot delta (+b-1)."""
        i = self.find(level, index)
        if i < 0:
            raise IllegalAction(f"node ({level}, {index}) is not in the working context")
        if level < 1:
            raise IllegalAction(f"node ({level}, {index}) is L0: tokens never expand")
        b = self.block_size
        self.levels = np.concatenate(
            [self.levels[:i], np.full(b, level - 1, dtype=np.int64), self.levels[i + 1 :]]
        )
        self.indices = np.concatenate(
            [self.indices[:i], index * b + np.arange(b, dtype=np.int64), self.indices[i + 1 :]]
        )
        return b - 1

    def collapse(self, level: int, index: int) -> int:
        """Replace the b children of parent (level, index) by it; returns the slot delta (-(b-1)).
        """
        b = self.block_size
        if not 1 <= level <= self.max_level:
            raise IllegalAction(f"cannot collapse into level {level} (levels 1..{self.max_level})")
        i = self.find(level - 1, index * b)
        if i < 0 or i not in set(self.group_starts().tolist()):
            raise IllegalAction(
                f"children of ({level}, {index}) do not form a legal sibling group "
                "(all b consecutive at one level, outside the recency tail)"
            )
        self.levels = np.concatenate(
            [self.levels[:i], np.array([level], dtype=np.int64), self.levels[i + b :]]
        )
        self.indices = np.concatenate(
            [self.indices[:i], np.array([index], dtype=np.int64), self.indices[i + b :]]
        )
        return -(b - 1)

    # -------------------------------------------------------------------------------- outputs
    def arrays(self, n_tail_gists: int = 6, max_positions: int | None = None) -> ContextArrays:
        """Everything a model needs about the current context (see ``ContextArrays``)."""
        b = self.block_size
        levels, indices = self.levels, self.indices
        d = self.tree.config.d_model
        emb = np.empty((len(self), d), dtype=self.tree.dtype)
        for level in np.unique(levels):  # one gather per level
            sel = levels == level
            emb[sel] = self.tree.embeddings(int(level), indices[sel])
        gid = self.group_ids()
        can_expand = self.can_expand()
        tail_gists, tail_levels, tail_mask = self.tail_gists(n_tail_gists)
        return ContextArrays(
            embeddings=emb,
            position_ids=self.position_ids(max_positions),
            levels=levels.copy(),
            node_index=indices.copy(),
            span_start=self.starts,
            span_width=self.widths,
            distance_to_cursor=self.n_tokens - self.ends,
            can_expand=can_expand,
            can_collapse=gid >= 0,
            group_id=gid,
            expand_cost=np.where(can_expand, b - 1, 0).astype(np.float32),
            collapse_refund=np.where(gid >= 0, (b - 1) / b, 0.0).astype(np.float32),
            tail_gists=tail_gists,
            tail_levels=tail_levels,
            tail_mask=tail_mask,
            n_tokens=self.n_tokens,
        )

    def tail_gists(self, n_tail_gists: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The newest gist of each level above 1, then the most recent L1 gists; zero padded."""
        d = self.tree.config.d_model
        gists = np.zeros((n_tail_gists, d), dtype=self.tree.dtype)
        levels = np.full(n_tail_gists, -1, dtype=np.int64)
        picks: list[tuple[int, int]] = []
        for level in range(self.max_level, 1, -1):
            n = self.tree.n_nodes(level)
            if n > 0 and len(picks) < n_tail_gists:
                picks.append((level, n - 1))
        n1 = self.tree.n_nodes(1)
        k = min(n_tail_gists - len(picks), n1)
        picks += [(1, i) for i in range(n1 - k, n1)]
        for slot, (level, index) in enumerate(picks):
            gists[slot] = self.tree.embeddings(level, np.array([index]))[0]
            levels[slot] = level
        return gists, levels, levels >= 0

    # ----------------------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Re-derive every invariant of DESIGN §2 and raise ``InvariantViolation`` on the first
        broken."""
        n, b = len(self), self.block_size
        levels, indices = self.levels, self.indices
        if levels.shape != indices.shape or levels.ndim != 1:
            raise InvariantViolation("shape", f"levels {levels.shape} vs indices {indices.shape}")
        if n > self.config.w_max:
            raise InvariantViolation("budget", f"{n} entries > w_max {self.config.w_max}")
        if np.any((levels < 0) | (levels > self.max_level)):
            raise InvariantViolation("tree_consistency", f"level outside [0, {self.max_level}]")
        # An entry is stored as a node name (level, index), so its true span [index*b**level,
        # (index+1)*b**level) is aligned and b**level wide by definition: no (levels, indices)
        # arrays
        # can break alignment or level consistency, only contiguity (tested with corrupted arrays).
        # What can break them is the derivation the consumers read (``starts``/``widths``/``ends``:
        # ``arrays()``, centre positions, ``find``), so both are checked on those derived spans
        # against b**level computed here, and every later check uses the same derived spans.
        starts, widths, ends = self.starts, self.widths, self.ends
        node_widths = b**levels
        if np.any(widths != node_widths) or np.any(ends - starts != node_widths):
            raise InvariantViolation("level_consistency", "span width != b**level")
        if np.any(starts % node_widths != 0):
            raise InvariantViolation(
                "block_alignment", "an entry start is not a multiple of b**level"
            )
        if self.n_tokens == 0:
            if n:
                raise InvariantViolation("contiguity", "entries present but T = 0")
            return
        if n == 0 or starts[0] != 0:
            raise InvariantViolation("contiguity", "the first entry does not start at token 0")
        gaps = np.flatnonzero(ends[:-1] != starts[1:])
        if gaps.size:
            i = int(gaps[0])
            kind = "gap" if ends[i] < starts[i + 1] else "overlap"
            raise InvariantViolation(
                "contiguity",
                f"{kind} between slot {i} (ends {ends[i]}) and slot {i + 1} (starts "
                f"{starts[i + 1]})",
            )
        if ends[-1] != self.n_tokens:
            raise InvariantViolation(
                "contiguity", f"last entry ends at {ends[-1]}, T = {self.n_tokens}"
            )
        if np.any(np.diff(starts) <= 0):
            raise InvariantViolation("monotonic_timeline", "entry starts do not strictly increase")
        if self.n_tokens > self.tree.n_tokens:
            raise InvariantViolation("tree_consistency", "context covers tokens the tree lacks")
        n_nodes = np.array([self.tree.n_nodes(int(lv)) for lv in levels])
        missing = np.flatnonzero(indices >= n_nodes)
        if missing.size:
            i = int(missing[0])
            raise InvariantViolation(
                "tree_consistency",
                f"slot {i} names node ({levels[i]}, {indices[i]}) which is not complete",
            )
        in_tail = ends > self.tail_start
        if np.any(levels[in_tail] != 0):
            raise InvariantViolation(
                "recency_tail", f"a gist stands in the last {self.config.tail_tokens} tokens"
            )
        pos = self.position_ids()
        if np.any(np.diff(pos) <= 0):
            raise InvariantViolation("positions", "position ids do not strictly increase")

    def focus_map(self, max_chars: int = 120) -> str:
        """A one-line picture of the context: one char per entry ('.' L0, '1'/'2'.. gists)."""
        chars = np.where(self.levels == 0, ".", self.levels.astype(str))
        line = "".join(chars.tolist())
        if len(line) > max_chars:
            line = line[: max_chars // 2 - 2] + " .. " + line[-(max_chars // 2 - 2) :]
        return line
