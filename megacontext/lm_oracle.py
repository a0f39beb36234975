"""The real-LM oracle (DESIGN.md §3, §7): NLL of the next H tokens under a frozen transformers
causal LM.

Each context is fed as ``inputs_embeds`` (token embeddings for L0 entries, gists for the rest) with
explicit ``position_ids``, followed by the H query tokens. Query token k is predicted from the
position before it, so the first from the last context entry (next-token labels, never the input
ids themselves). Query positions continue after the last context position (slot mode: N..N+H-1;
centre mode: T..T+H-1 since the tail is L0).

Fast path: counterfactual variants differ from the baseline context only from their first edited
slot on. The baseline's KV cache is computed once; variants are sorted by edit position and run in
batches, each batch only from its earliest edit on (right-padded: causal attention never lets a real
token see padding to its right) on top of that shared prefix. An explicit attention mask is always
passed: without it transformers treats jumps in position ids as packed-sequence boundaries.
``fast=False`` recomputes every variant
in full; the tests hold the two equal to 1e-4. Only the H query positions go through the output
head, so logits never take (batch x length x vocab) memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from megacontext.working_context import ContextArrays


class PositionError(ValueError):
    """A forward asked the LM for a position at or past its trained window."""


def guard_positions(model) -> None:
    """Make every forward of ``model``'s transformer refuse a position >= its
    ``max_position_embeddings`` (a ``PositionError``), whoever calls it: explicit ``position_ids``
    or the implicit 0..L-1 (after any cached prefix). Installed once per model (an LMOracle does
    it): no figure may come from positions the LM was never trained on."""
    base = model.base_model
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or getattr(base, "_position_guard", False):
        return

    def check(_module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None:
            top = int(pos.max()) if pos.numel() else -1
        else:
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("past_key_values") or kwargs.get("cache")
            past = int(cache.get_seq_length()) if cache is not None else 0
            top = past + (int(x.shape[1]) - 1 if x is not None else 0)
        if top >= limit:
            raise PositionError(
                f"a forward asked {type(model).__name__} for position {top}, past its trained "
                f"window of {limit} positions"
            )

    base.register_forward_pre_hook(check, with_kwargs=True)
    base._position_guard = True


class LMOracle:
    """``NLLOracle`` backed by a causal LM; ``token_embeddings`` gives the L0 embeddings for the
    tree."""

    def __init__(self, model, batch_size: int = 16, fast: bool = True) -> None:
        self.model = model.eval()
        self.decoder = model.base_model  # the transformer without its output head
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.d_model = int(model.config.hidden_size)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.batch_size = batch_size
        self.fast = fast
        # transformers >= 5.2x calls the KV cache ``cache``; earlier releases ``past_key_values``
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.positions_recomputed = 0  # positions run through the LM (benchmark accounting)
        guard_positions(model)

    @torch.no_grad()
    def token_embeddings(self, token_ids: np.ndarray) -> np.ndarray:
        """(n, d) float32 input embeddings of ``token_ids`` (what L0 tree nodes hold)."""
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=self.device)
        return self.embed(ids).float().cpu().numpy()

    # ------------------------------------------------------------------------------ forward
    def _run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
        pick: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Mean CE over the H picked positions per row. embeds (B, L, d); pick/targets (B, H)."""
        self.positions_recomputed += int(embeds.shape[0] * embeds.shape[1])
        out = self.decoder(
            inputs_embeds=embeds,
            position_ids=positions,
            use_cache=False,
            attention_mask=_full_mask(embeds, cache),
            **{self._cache_kw: cache},
        )
        hidden = out.last_hidden_state  # (B, L, d)
        h = torch.gather(hidden, 1, pick[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, H, d)
        logits = self.head(h).float()  # (B, H, V)
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none"
        )  # (B, H)
        return ce.mean(dim=1)

    def _query(self, query_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(np.asarray(query_ids), dtype=torch.long, device=self.device)
        return ids, self.embed(ids).to(self.dtype)

    def _batch(
        self,
        ctxs: list[ContextArrays],
        start: int,
        q_ids: torch.Tensor,
        q_emb: torch.Tensor,
        cache_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> torch.Tensor:
        """NLL for contexts sharing their first ``start`` entries (whose K/V ``cache_kv`` holds)."""
        h = q_ids.shape[0]
        seqs, poss, picks = [], [], []
        for c in ctxs:
            n = c.levels.shape[0]
            emb = torch.as_tensor(c.embeddings[start:], device=self.device).to(self.dtype)
            seqs.append(torch.cat([emb, q_emb], dim=0))
            q_pos = int(c.position_ids[-1]) + 1 + np.arange(h)
            poss.append(
                torch.as_tensor(np.concatenate([c.position_ids[start:], q_pos]), device=self.device)
            )
            picks.append(
                torch.arange(n - 1 - start, n - 1 - start + h, device=self.device)
            )  # predicts query k
        length = max(s.shape[0] for s in seqs)
        embeds = torch.zeros(len(seqs), length, self.d_model, dtype=self.dtype, device=self.device)
        positions = torch.zeros(len(seqs), length, dtype=torch.long, device=self.device)
        for r, (s, p) in enumerate(zip(seqs, poss, strict=True)):
            embeds[r, : s.shape[0]] = s
            positions[r, : p.shape[0]] = p
            positions[r, p.shape[0] :] = (
                p[-1] + 1 + torch.arange(length - p.shape[0], device=self.device)
            )
        cache = None
        if cache_kv is not None and start > 0:
            m = len(seqs)
            cache = DynamicCache(
                ddp_cache_data=[
                    (
                        k[:, :, :start].expand(m, -1, -1, -1).contiguous(),
                        v[:, :, :start].expand(m, -1, -1, -1).contiguous(),
                    )
                    for k, v in cache_kv
                ],
                config=self.model.config,
            )
        targets = q_ids[None, :].expand(len(seqs), -1)
        return self._run(embeds, positions, cache, torch.stack(picks), targets)

    @torch.no_grad()
    def nll(
        self, contexts: Sequence[ContextArrays], query_ids: np.ndarray, query_start: int
    ) -> np.ndarray:
        """(len(contexts),) mean next-token NLL of ``query_ids`` after each context."""
        if len(contexts) == 0:
            return np.zeros(0)
        for c in contexts:
            if c.embeddings.shape[1:] != (self.d_model,) or c.levels.shape[0] == 0:
                raise ValueError(
                    f"contexts need (N >= 1, d_model={self.d_model}) embeddings, got "
                    f"{c.embeddings.shape}"
                )
            if int(c.position_ids[-1]) + len(query_ids) >= self.max_positions:
                raise ValueError(f"positions exceed the LM's {self.max_positions}")
        q_ids, q_emb = self._query(query_ids)
        result = torch.empty(len(contexts), dtype=torch.float32)
        if not self.fast:
            for s in range(0, len(contexts), self.batch_size):
                chunk = list(contexts[s : s + self.batch_size])
                result[s : s + len(chunk)] = self._batch(chunk, 0, q_ids, q_emb, None).float().cpu()
            return result.numpy().astype(np.float64)
        base = contexts[0]
        # the shared prefix: K/V of the baseline context (its last entry is always recomputed)
        emb = torch.as_tensor(base.embeddings, device=self.device).to(self.dtype)[None]
        pos = torch.as_tensor(base.position_ids, device=self.device)[None]
        self.positions_recomputed += int(emb.shape[1])
        out = self.decoder(
            inputs_embeds=emb,
            position_ids=pos,
            use_cache=True,
            attention_mask=_full_mask(emb, None),
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        # Order by edit position and batch neighbours: a batch shares the prefix before its
        # earliest edit, so batches stay full (CPU throughput needs batching) at the cost of
        # recomputing a few positions that a per-edit-position group would have reused.
        edit = [
            min(_first_difference(base, c), c.levels.shape[0] - 1, base.levels.shape[0] - 1)
            for c in contexts
        ]
        order = sorted(range(len(contexts)), key=lambda i: edit[i])
        for s in range(0, len(order), self.batch_size):
            part = order[s : s + self.batch_size]
            start = min(edit[i] for i in part)
            vals = self._batch([contexts[i] for i in part], start, q_ids, q_emb, kv)
            result[part] = vals.float().cpu()
        return result.numpy().astype(np.float64)


@torch.no_grad()
def answer_scores(
    oracle: LMOracle,
    context: ContextArrays | None,
    answer_ids: np.ndarray,
    prefix_ids: np.ndarray | None = None,
) -> tuple[float, bool]:
    """(mean NLL per answer token, exact match) of ``answer_ids`` read after ``context`` (a working
    context) or, with ``prefix_ids``, after those raw tokens (the full-context ceiling).

    Exact match = the argmax of every answer position is the answer token (teacher-forced), which
    equals greedy decoding of the answer (DESIGN §9).
    """
    if (context is None) == (prefix_ids is None):
        raise ValueError("give exactly one of context and prefix_ids")
    q_ids, q_emb = oracle._query(answer_ids)
    if context is not None:
        emb = torch.as_tensor(context.embeddings, device=oracle.device).to(oracle.dtype)
        pos = np.asarray(context.position_ids)
    else:
        ids = torch.as_tensor(np.asarray(prefix_ids), dtype=torch.long, device=oracle.device)
        emb = oracle.embed(ids).to(oracle.dtype)
        pos = np.arange(len(prefix_ids))
    n, h = emb.shape[0], q_ids.shape[0]
    if int(pos[-1]) + h >= oracle.max_positions:
        raise ValueError(f"positions exceed the LM's {oracle.max_positions}")
    embeds = torch.cat([emb, q_emb], dim=0)[None]
    positions = torch.as_tensor(
        np.concatenate([pos, int(pos[-1]) + 1 + np.arange(h)]), device=oracle.device
    )[None]
    out = oracle.decoder(
        inputs_embeds=embeds,
        position_ids=positions,
        use_cache=False,
        attention_mask=_full_mask(embeds, None),
    )
    logits = oracle.head(
        out.last_hidden_state[0, n - 1 : n - 1 + h]
    ).float()  # (h, V): position k predicts answer k
    nll = torch.nn.functional.cross_entropy(logits, q_ids).item()
    return float(nll), bool(torch.equal(logits.argmax(-1), q_ids))


def _full_mask(embeds: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
    """An explicit all-ones 2D mask. Without one, transformers reads non-consecutive position ids
    (centre mode: gists at span centres) as *packed sequences* and blocks attention across every
    jump, silently cutting the context; a 2D mask turns that inference off."""
    past = cache.get_seq_length() if cache is not None else 0
    return torch.ones(
        embeds.shape[0], past + embeds.shape[1], dtype=torch.long, device=embeds.device
    )


def _first_difference(a: ContextArrays, b: ContextArrays) -> int:
    """First slot whose node (level, index), embedding input or position differs."""
    n = min(a.levels.shape[0], b.levels.shape[0])
    same = (
        (a.levels[:n] == b.levels[:n])
        & (a.node_index[:n] == b.node_index[:n])
        & (a.position_ids[:n] == b.position_ids[:n])
    )
    diff = np.flatnonzero(~same)
    return int(diff[0]) if diff.size else n
