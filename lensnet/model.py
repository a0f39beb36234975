"""LensNet (DESIGN.md §5): a Perceiver-IO-style dual cross-attention scorer over the working
context.

Each stack lets the few *tail gists* (what the model is about to read) cross-attend to the whole
working context, then lets every context entry cross-attend back to those updated tail gists;
nothing is causal and every attention has padding masks. A linear head gives one raw signed score
per entry (no tanh: targets are in nats). A learned *null* latent is always present among the
tail keys, so a snapshot with no tail gist (or no valid entry) still attends to something and never
produces NaN. Two inputs beyond DESIGN §5's list: each entry also sees the mean of its sibling group
(a collapse cost belongs to the whole group, which a per-entry model cannot otherwise know since
context entries never attend to each other), and tail gists carry a slot embedding (which one is
newest). Ordering follows nanoGPT: leaves first (MLP -> cross-attention block -> config -> model).

``LensNet.forward`` computes the same function as ``LensNet.reference_forward`` (the direct
formulation through ``nn.MultiheadAttention``; the tests compare the two) with less arithmetic
because one side of every attention is the handful of tail latents (1 + n_tail_gists): the
per-entry query/key/value/output projections are folded through that side (a (T, d) product per
snapshot instead of an (N, d) x (d, d) one), only the match columns of real tail slots are read
out, group-level work runs once per group, and the per-entry layers run on the valid entries
only (packed), not on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megacontext.allocator import mask_illegal
from megacontext.tree import ConfigError

MAX_TAIL = 64


def group_mean(x: Tensor, group_id: Tensor) -> Tensor:
    """(B, N, d) mean of ``x`` over each entry's sibling group (same id within a snapshot); 0 where
    ``group_id`` < 0. One scatter-add over all snapshots, no loop. Ids must be < N (else groups
    of neighbouring snapshots would share keys); ``LensNet`` checks this at its input."""
    b, n, d = x.shape
    valid = group_id >= 0
    key = torch.where(
        valid, group_id + n * torch.arange(b, device=x.device)[:, None], b * n
    ).reshape(-1)  # (B*N,)
    sums = x.new_zeros(b * n + 1, d).index_add_(0, key, x.reshape(-1, d))
    counts = x.new_zeros(b * n + 1).index_add_(0, key, x.new_ones(b * n))
    mean = (sums / counts.clamp_min(1)[:, None])[key].reshape(b, n, d)
    return torch.where(valid[..., None], mean, torch.zeros_like(mean))


class _Packing:
    """Index bookkeeping of one batch: the valid entries packed into R rows, and their groups.

    ``rows`` (R,) are the flat (B*N) positions of the valid entries; ``group`` (R,) maps each to a
    group row (0 = no group, 1..G = the snapshot-local sibling groups); ``is_group`` (G+1,)."""

    def __init__(self, valid: Tensor, group_id: Tensor | None) -> None:
        self.b, self.n = valid.shape
        self.rows = valid.reshape(-1).nonzero().squeeze(1)  # (R,)
        if group_id is None:
            self.group = None
            return
        offset = self.n * torch.arange(self.b, device=valid.device)[:, None]
        key = torch.where(group_id >= 0, group_id + offset, -1).reshape(-1)  # (B*N,) -1 = no group
        key = torch.cat(
            [key.new_full((1,), -1), key]
        )  # row 0 of the unique keys is always "no group"
        uniq, inv = torch.unique(key, return_inverse=True)
        self.group, self.is_group = inv[1:][self.rows], uniq >= 0  # (R,), (G+1,)
        self.n_groups = uniq.shape[0]

    def pad(self, packed: Tensor) -> Tensor:
        """(R, ...) -> (B, N, ...), zeros on padding."""
        out = packed.new_zeros(self.b * self.n, *packed.shape[1:]).index_copy(0, self.rows, packed)
        return out.view(self.b, self.n, *packed.shape[1:])

    def unpad(self, x: Tensor) -> Tensor:
        """(B, N, ...) -> (R, ...)."""
        return x.reshape(self.b * self.n, *x.shape[2:]).index_select(0, self.rows)

    def group_means(self, x: Tensor) -> Tensor:
        """(G+1, d) mean of packed ``x`` (R, d) over each group; row 0 (no group) is zero."""
        sums = x.new_zeros(self.n_groups, x.shape[-1]).index_add_(0, self.group, x)
        counts = x.new_zeros(self.n_groups).index_add_(0, self.group, x.new_ones(x.shape[0]))
        mean = sums / counts.clamp_min(1)[:, None]
        return torch.where(self.is_group[:, None], mean, torch.zeros_like(mean))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttentionBlock(nn.Module):
    """Pre-norm: x = x + Attn(LN(x), LN(ctx)); x = x + MLP(LN(x)).

    ``reference`` runs it through ``nn.MultiheadAttention``. ``few_keys`` / ``few_queries`` compute
    the same thing when the keys (resp. the queries) are the few tail latents, folding the
    projections of the many side through the few: with k_h = K W_k,h + b_k,h, the logits Q_h k_h^T
    are
    LN(x) (W_q,h^T k_h^T) + b_q,h k_h^T, and the output sum_h A_h V_h W_o,h^T is A_h (V_h W_o,h^T),
    both (T, d) per snapshot and head; symmetrically for few queries."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.mlp = MLP(d, dropout)

    def reference(self, x: Tensor, ctx: Tensor, ctx_pad: Tensor) -> Tensor:
        # x (B, Q, d) queries; ctx (B, K, d) keys/values; ctx_pad (B, K) True = padding (ignored)
        kv = self.ln_kv(ctx)
        x = x + self.attn(self.ln_q(x), kv, kv, key_padding_mask=ctx_pad, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))

    def _weights(self) -> tuple[Tensor, ...]:
        """Per-head projection weights: w_q, w_k, w_v (H, dh, d), biases (H, dh), w_o (H, dh, d),
        b_o (d,)."""
        h = self.attn.num_heads
        d = self.attn.embed_dim
        wq, wk, wv = (w.view(h, d // h, d) for w in self.attn.in_proj_weight.chunk(3))
        bq, bk, bv = (b.view(h, d // h) for b in self.attn.in_proj_bias.chunk(3))
        wo = self.attn.out_proj.weight.view(d, h, d // h).permute(
            1, 2, 0
        )  # (H, dh, d): head h's columns
        return wq, wk, wv, bq, bk, bv, wo, self.attn.out_proj.bias

    def _attn_dropout(self, a: Tensor) -> Tensor:
        return F.dropout(a, self.attn.dropout, self.training)

    def few_keys(self, x: Tensor, pack: _Packing, ctx: Tensor, ctx_pad: Tensor) -> Tensor:
        """``reference`` for packed many queries ``x`` (R, d) and few keys ``ctx`` (B, K, d)."""
        wq, wk, wv, bq, bk, bv, wo, bo = self._weights()
        hd, dh = wq.shape[0], wq.shape[1]
        b, k_len, d = ctx.shape
        kv = self.ln_kv(ctx)
        k = torch.einsum("bkd,hed->bhke", kv, wk) + bk[:, None, :]  # (B, H, K, dh)
        v = torch.einsum("bkd,hed->bhke", kv, wv) + bv[:, None, :]
        kq = torch.einsum("bhke,hed->bhkd", k, wq).reshape(
            b, hd * k_len, d
        )  # (B, H*K, d): W_q folded in
        kb = torch.einsum("bhke,he->bhk", k, bq).reshape(b, 1, hd * k_len)  # b_q . k
        vo = torch.einsum("bhke,hed->bhkd", v, wo).reshape(
            b, hd * k_len, d
        )  # (B, H*K, d): W_o folded in
        q = pack.pad(self.ln_q(x))  # (B, N, d)
        logits = (torch.baddbmm(kb, q, kq.transpose(1, 2)) / math.sqrt(dh)).view(
            b, -1, hd, k_len
        )  # (B, N, H, K)
        logits = logits.masked_fill(ctx_pad[:, None, None, :], -math.inf)
        a = self._attn_dropout(torch.softmax(logits, dim=-1)).view(b, -1, hd * k_len)
        x = x + pack.unpad(torch.bmm(a, vo)) + bo  # (R, d)
        return x + self.mlp(self.ln_mlp(x))

    def few_queries(self, x: Tensor, ctx: Tensor, pack: _Packing, ctx_pad: Tensor) -> Tensor:
        """``reference`` for few queries ``x`` (B, Q, d) and packed many keys ``ctx`` (R, d)."""
        wq, wk, wv, bq, bk, bv, wo, bo = self._weights()
        hd, dh = wq.shape[0], wq.shape[1]
        b, q_len, d = x.shape
        q = torch.einsum("bqd,hed->bhqe", self.ln_q(x), wq) + bq[:, None, :]  # (B, H, Q, dh)
        qk = torch.einsum("bhqe,hed->bhqd", q, wk).reshape(
            b, hd * q_len, d
        )  # (B, H*Q, d): W_k folded in
        qb = torch.einsum("bhqe,he->bhq", q, bk).reshape(b, hd * q_len, 1)  # q . b_k
        kv = pack.pad(self.ln_kv(ctx))  # (B, N, d)
        logits = (torch.baddbmm(qb, qk, kv.transpose(1, 2)) / math.sqrt(dh)).view(
            b, hd, q_len, -1
        )  # (B, H, Q, N)
        logits = logits.masked_fill(ctx_pad[:, None, None, :], -math.inf)
        a = self._attn_dropout(torch.softmax(logits, dim=-1))
        akv = torch.bmm(a.view(b, hd * q_len, -1), kv).view(
            b, hd, q_len, d
        )  # (B, H, Q, d): sum_n a_n LN(x_n)
        # sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + (sum_n a_n) b_v (sum_n a_n = 1 without
        # dropout)
        o = (
            torch.einsum("bhqd,hed->bhqe", akv, wv) + a.sum(-1, keepdim=True) * bv[:, None, :]
        )  # (B, H, Q, dh)
        x = x + torch.einsum("bhqe,hed->bqd", o, wo) + bo
        return x + self.mlp(self.ln_mlp(x))


@dataclass(frozen=True)
class LensNetConfig:
    """LensNet sizes; defaults are the seed's (DESIGN §5). ``tiny``/``small`` are CPU presets."""

    d_model: int = 1024
    """Width of the node embeddings it reads (the LM's hidden size)."""
    d_lens: int = 512
    """Internal width."""
    n_heads: int = 8
    """Attention heads (must divide d_lens)."""
    n_stacks: int = 2
    """Stacks of [tail <- context] then [context <- tail] cross-attention."""
    dropout: float = 0.1
    """Dropout in attention and MLPs."""
    max_level: int = 2
    """Highest tree level (sizes the level embedding)."""
    block_size: int = 32
    """b, to scale the span-width feature."""
    match_skip: bool = False
    """Add a linear read-out of the match features straight to the score, one weight vector per
    entry kind (level x whether its sibling group can collapse). A utility is close to linear in
    the match for a fixed kind (gain = demand x info step; a group's cost = the sum over its
    members), so this path learns it directly instead of through the stacks and the final norm.
    Off by default so checkpoints written before it load unchanged; the presets turn it on."""

    match_form: str = "factored"
    """The match's bilinear form between an entry and a tail gist: 'factored' (e W_q^T W_k g, rank
    <= d_lens) or 'full' (e M g with one d_model x d_model matrix per match: a product of two
    factors fewer between the score and the data, so it learns faster)."""

    n_entry_features: int = 0
    """Extra per-entry features read from the batch's ``entry_features`` (B, N, f) (the task world's
    attention features, ``sim.taskworld.keystore``): projected into every entry's representation and
    read out linearly per entry kind straight to the score. 0 = off (the seed's inputs only)."""

    feature_set: str = "attention"
    """Which per-entry features ``n_entry_features`` counts
    (``sim.taskworld.keystore.FEATURE_SETS``: the task world builds them to match,
    ``sim.taskworld.features.lensnet_item``); recorded so a checkpoint is never fed another set of
    the same width."""

    n_query_tokens: int = 0
    """Tail latents after the tail gists: the embeddings of the newest this many tokens (the task
    world's question at question time), so the query reaches every score. 0 = tail gists only. The
    batch's ``tail_gists`` then holds n_tail_gists + n_query_tokens rows (``sim.taskworld.features.
    lensnet_item`` builds them)."""

    prior: str = ""
    """A training-free selector the score starts from: '' (none) or 'bm25' (the last entry feature
    of the 'prior-lexical' set is the BM25 baseline's signed allocator score,
    ``sim.taskworld.features.bm25_prior``). The score is then ``prior_gain x prior + the
    network's``, with ``prior_gain`` a learnt scalar (1 at the start) and every read-out of the
    network zero at the start: an untrained LensNet scores exactly as the prior does, and training
    adds to it."""

    def __post_init__(self) -> None:
        if self.prior not in ("", "bm25"):
            raise ConfigError(f"prior must be '' or 'bm25', got {self.prior!r}")
        if self.prior and (self.feature_set != "prior-lexical" or not self.n_entry_features):
            raise ConfigError(
                f"prior {self.prior!r} reads the 'prior-lexical' entry features; got feature_set "
                f"{self.feature_set!r} with n_entry_features={self.n_entry_features}"
            )
        if self.n_query_tokens < 0 or self.n_query_tokens >= MAX_TAIL:
            raise ConfigError(
                f"n_query_tokens must lie in [0, {MAX_TAIL}), got {self.n_query_tokens}"
            )
        if self.n_entry_features < 0:
            raise ConfigError(f"n_entry_features must be >= 0, got {self.n_entry_features}")
        if self.match_form not in ("factored", "full"):
            raise ConfigError(f"match_form must be 'factored' or 'full', got {self.match_form!r}")
        for name in ("d_model", "d_lens", "n_heads", "n_stacks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_lens % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide d_lens ({self.d_lens})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls, d_model: int, **kw) -> LensNetConfig:
        """~0.1M params: tests and quick CPU runs."""
        return cls(
            d_model=d_model,
            d_lens=32,
            n_heads=4,
            n_stacks=2,
            dropout=0.0,
            **{"match_skip": True, "match_form": "full", **kw},
        )

    @classmethod
    def small(cls, d_model: int, **kw) -> LensNetConfig:
        """~0.8M params (d_model 128): CPU training on synthetic traces. Two wide heads: a match
        between a context key and a tail cue is a bilinear form that narrow heads only see in part.
        """
        return cls(
            d_model=d_model,
            d_lens=128,
            n_heads=2,
            n_stacks=2,
            dropout=0.0,
            **{"match_skip": True, "match_form": "full", **kw},
        )


class LensNet(nn.Module):
    """Scores every working-context entry: positive = expand, negative = collapse cost."""

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_lens
        self.proj = nn.Linear(config.d_model, d)
        self.level_emb = nn.Embedding(config.max_level + 1, d)
        self.feat = nn.Linear(2, d)  # (log2 span width / log2 b^max_level, log1p distance / 10)
        self.group_proj = nn.Linear(
            d, d
        )  # what the entry's sibling group holds (collapse costs are per group)
        self.tail_slot = nn.Embedding(
            MAX_TAIL, d
        )  # which tail slot (top level first, newest L1 last)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.stacks = nn.ModuleList(
            nn.ModuleList(
                [
                    CrossAttentionBlock(d, config.n_heads, config.dropout),
                    CrossAttentionBlock(d, config.n_heads, config.dropout),
                ]
            )
            for _ in range(config.n_stacks)
        )
        # Direct match features: one bilinear score per (entry, tail slot), fed to the head. The
        # same
        # quantity as an attention logit, but without the softmax in the way its gradient is direct,
        # which is what lets a "this entry is what the tail is about to need" match be learnt fast.
        # Matched twice: the entry's own embedding, and its sibling group's mean embedding (for
        # tokens,
        # the group mean is their block's clean content; a single token is noisy).
        if config.match_form == "full":  # (2, d_model, d_model): own and group forms
            self.match_m = nn.Parameter(
                torch.randn(2, config.d_model, config.d_model) / config.d_model
            )
        else:
            self.match_q = nn.Linear(config.d_model, d, bias=False)
            self.match_qg = nn.Linear(config.d_model, d, bias=False)
            self.match_k = nn.Linear(config.d_model, d, bias=False)
        # one read-out per level: a needed block is worth +gain as a gist but -cost as tokens
        self.match_out = nn.Linear(2 * (MAX_TAIL + 1), d * (config.max_level + 1))
        if config.match_skip:  # (kinds, match columns): kind = 2 x level + [group can collapse]
            self.match_skip = nn.Parameter(
                torch.zeros(2 * (config.max_level + 1), 2 * (MAX_TAIL + 1))
            )
        if config.n_entry_features:  # extra per-entry inputs: into the representation, and a
            # linear read-out per entry kind (level x grouped) straight to the score
            self.entry_in = nn.Linear(config.n_entry_features, d)
            self.entry_skip = nn.Parameter(
                torch.zeros(2 * (config.max_level + 1), config.n_entry_features + 1)
            )
        if config.prior:  # the prior's weight in the score (sim.taskworld.features.bm25_prior)
            self.prior_gain = nn.Parameter(torch.ones(()))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        # Calibration: ``score`` multiplies the raw scores by this (fitted on validation episodes so
        # that the allocator's nat thresholds act on a shrunk scorer; the same as tau_expand / it).
        # Not a parameter: it lives in the checkpoint's ``calibration`` and ``load_model`` sets it.
        self.score_scale = 1.0
        self.score_gate = "scale"  # or 'rank': how policies gate the scores (lensnet.train.GATES)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _check(self, batch: dict[str, Tensor]) -> None:
        emb = batch["embeddings"]
        if emb.dim() != 3 or emb.shape[-1] != self.config.d_model:
            raise ValueError(
                f"embeddings must be (B, N, d_model={self.config.d_model}), got {tuple(emb.shape)}"
            )
        tail = batch["tail_gists"]
        if tail.dim() != 3 or tail.shape[-1] != self.config.d_model:
            raise ValueError(
                f"tail_gists must be (B, T, d_model={self.config.d_model}), got {tuple(tail.shape)}"
            )
        if tail.shape[1] > MAX_TAIL:
            raise ValueError(f"at most {MAX_TAIL} tail rows (tail gists, then the query's tokens), "
                             f"got {tail.shape[1]}")
        f = self.config.n_entry_features
        if f and (
            "entry_features" not in batch
            or tuple(batch["entry_features"].shape) != (*emb.shape[:2], f)
        ):
            got = tuple(batch["entry_features"].shape) if "entry_features" in batch else "nothing"
            raise ValueError(f"entry_features must be (B, N, {f}) for this LensNet, got {got}")
        if batch["levels"].numel() and int(batch["levels"].max()) > self.config.max_level:
            raise ValueError(f"levels exceed max_level={self.config.max_level}")
        gid = batch.get("group_id")
        if gid is not None and gid.numel():
            n = emb.shape[1]
            gid = gid[
                batch["valid_mask"].bool()
            ]  # ids on padding are ignored (padding joins no group)
            if gid.numel() and (int(gid.min()) < -1 or int(gid.max()) >= n):
                raise ValueError(
                    f"group_id must be -1 (no group) or a slot index < N={n}, got values in "
                    f"[{int(gid.min())}, {int(gid.max())}]"
                )

    @staticmethod
    def _group_id(batch: dict[str, Tensor]) -> Tensor | None:
        """(B, N) group ids with padding set to -1, or None without the key."""
        if "group_id" not in batch:
            return None
        return torch.where(batch["valid_mask"].bool(), batch["group_id"], -1)

    def _entry_features(
        self, emb: Tensor, levels: Tensor, span_width: Tensor, distance: Tensor
    ) -> Tensor:
        """(..., d) entry features before the group term; ``levels`` already clamped."""
        cfg = self.config
        span = torch.log2(span_width.to(self.proj.weight.dtype).clamp_min(1)) / max(
            math.log2(cfg.block_size**cfg.max_level), 1
        )
        dist = torch.log1p(distance.to(self.proj.weight.dtype).clamp_min(0)) / 10
        return self.proj(emb) + self.level_emb(levels) + self.feat(torch.stack([span, dist], -1))

    def _feature_terms(
        self, feats: Tensor, levels: Tensor, grouped: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The extra features' (``n_entry_features``) share of the representation (..., d) and of
        the score (...,): a linear read-out (with a bias) per entry kind."""
        w = self.entry_skip[2 * levels + grouped.long()]  # (..., f + 1)
        direct = (w[..., :-1] * feats).sum(-1) + w[..., -1]
        return self.entry_in(feats), direct

    def _match_keys(self, tail_gists: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, d_model) twice: each tail gist mapped through the own and the group bilinear form,
        so that a match is one dot product with the entry's (or its group's) embedding."""
        if self.config.match_form == "full":
            return tail_gists @ self.match_m[0].T, tail_gists @ self.match_m[1].T
        keys = self.match_k(tail_gists)  # (B, T, d)
        return keys @ self.match_q.weight, keys @ self.match_qg.weight

    def _tail_latents(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, 1+T, d): the null latent, then the tail gists with level and slot embeddings."""
        n_tail_rows = batch["tail_gists"].shape[1]  # tail gists, then the query's tokens
        tail = (
            self.proj(batch["tail_gists"])
            + self.level_emb(batch["tail_levels"].clamp(0, self.config.max_level))
            + self.tail_slot.weight[:n_tail_rows]
        )  # (B, T, d)
        return torch.cat([self.null.expand(tail.shape[0], 1, -1), tail], dim=1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Raw scores (B, N); 0 on padding. Keys: embeddings (B,N,d), levels, span_width,
        distance_to_cursor, valid_mask (B,N); tail_gists (B,T,d), tail_levels, tail_mask (B,T);
        optional group_id (B,N) (-1: no group; else a slot < N, -1 on padding)."""
        self._check(batch)
        cfg = self.config
        valid = batch["valid_mask"].bool()
        pack = _Packing(valid, self._group_id(batch))
        b, n = valid.shape
        # per-entry work on the R valid entries only (packed); attention pads them back per snapshot
        emb = pack.unpad(batch["embeddings"])  # (R, d_model)
        levels = pack.unpad(batch["levels"]).clamp(0, cfg.max_level)  # (R,)
        x = self._entry_features(
            emb, levels, pack.unpad(batch["span_width"]), pack.unpad(batch["distance_to_cursor"])
        )  # (R, d)
        if cfg.n_entry_features:
            grouped_r = (
                pack.unpad(batch["group_id"]) >= 0
                if "group_id" in batch
                else torch.zeros_like(levels, dtype=torch.bool)
            )
            into, direct = self._feature_terms(
                pack.unpad(batch["entry_features"]).to(x.dtype), levels, grouped_r
            )
            x = x + into
        tail = self._tail_latents(batch)  # (B, 1+T, d)
        if (
            pack.group is not None
        ):  # group_proj(group mean): once per group; 0 -> bias for the ungrouped
            x = x + self.group_proj(pack.group_means(x))[pack.group]
            grp = torch.where(
                pack.is_group[pack.group][:, None], pack.group_means(emb)[pack.group], emb
            )  # (R, d_model)
        else:
            grp = emb
        tail_mask = batch["tail_mask"].bool()
        tail_pad = torch.cat([tail_mask.new_zeros(b, 1), ~tail_mask], dim=1)
        ctx_pad = ~valid & valid.any(-1, keepdim=True)  # as in reference_forward
        # match features: own/group embedding . (tail key W_q), one product per snapshot and tail
        # slot
        kq, kqg = self._match_keys(batch["tail_gists"])  # (B, T, d_model) each
        own = torch.bmm(batch["embeddings"], kq.transpose(1, 2))  # (B, N, T)
        group = torch.bmm(pack.pad(grp), kqg.transpose(1, 2))
        match = torch.stack([own, group], -1)  # (B, N, T, 2)
        match = torch.where(
            tail_mask[:, None, :, None], match, torch.zeros_like(match)
        ) / math.sqrt(cfg.d_lens)
        match = pack.unpad(
            match.flatten(2)
        )  # (R, 2T): the slots past T are zero, so their columns are skipped
        per_level = F.linear(match, self.match_out.weight[:, : match.shape[1]], self.match_out.bias)
        per_level = per_level.unflatten(-1, (cfg.max_level + 1, -1))  # (R, L, d)
        x = x + torch.gather(
            per_level, 1, levels[:, None, None].expand(-1, 1, per_level.shape[-1])
        ).squeeze(1)
        for to_tail, to_ctx in self.stacks:
            tail = to_tail.few_queries(tail, x, pack, ctx_pad)
            x = to_ctx.few_keys(x, pack, tail, tail_pad)
        scores = self.head(self.ln_f(x)).squeeze(-1)  # (R,)
        if cfg.match_skip:
            grouped = (
                pack.unpad(batch["group_id"]) >= 0
                if "group_id" in batch
                else torch.zeros_like(levels, dtype=torch.bool)
            )
            w = self.match_skip[2 * levels + grouped.long(), : match.shape[1]]  # (R, 2T)
            scores = scores + (w * match).sum(-1)
        if cfg.n_entry_features:
            scores = scores + direct
        if cfg.prior:
            scores = scores + self.prior_gain * pack.unpad(batch["entry_features"])[:, -1]
        return pack.pad(scores)

    def reference_forward(self, batch: dict[str, Tensor]) -> Tensor:
        """``forward`` computed directly as DESIGN §5 reads (padded, through
        ``nn.MultiheadAttention``);
        the tests and the training benchmark compare against it."""
        self._check(batch)
        cfg = self.config
        valid = batch["valid_mask"].bool()
        levels = batch["levels"].clamp(0, cfg.max_level)
        x = self._entry_features(
            batch["embeddings"], levels, batch["span_width"], batch["distance_to_cursor"]
        )  # (B, N, d)
        gid = self._group_id(batch)
        if cfg.n_entry_features:
            grouped_f = gid >= 0 if gid is not None else torch.zeros_like(levels, dtype=torch.bool)
            feats = batch["entry_features"].to(x.dtype)
            into, direct = self._feature_terms(feats, levels, grouped_f)
            x = x + into
        tail = self._tail_latents(batch)  # (B, 1+T, d)
        if gid is not None:
            x = x + self.group_proj(group_mean(x, gid))
        tail_mask = batch["tail_mask"].bool()
        n_tail_rows = batch["tail_gists"].shape[1]  # tail gists, then the query's tokens
        b = x.shape[0]
        tail_pad = torch.cat([tail.new_zeros(b, 1, dtype=torch.bool), ~tail_mask], dim=1)
        # An all-padding snapshot would leave the tail with no key (NaN): let it attend to the
        # padding instead; its scores are zeroed below anyway.
        ctx_pad = ~valid & valid.any(-1, keepdim=True)
        # match features enter before the stacks, read out per level
        emb = batch["embeddings"]
        kq, kqg = self._match_keys(batch["tail_gists"])  # (B, T, d_model) each
        own = torch.einsum("bnd,btd->bnt", emb, kq)
        grp = emb if gid is None else torch.where((gid >= 0)[..., None], group_mean(emb, gid), emb)
        group = torch.einsum("bnd,btd->bnt", grp, kqg)
        match = torch.stack([own, group], -1)  # (B, N, T, 2)
        match = torch.where(
            tail_mask[:, None, :, None], match, torch.zeros_like(match)
        ) / math.sqrt(self.config.d_lens)
        match = torch.nn.functional.pad(match, (0, 0, 0, MAX_TAIL + 1 - n_tail_rows)).flatten(
            2
        )  # slot-aligned
        per_level = self.match_out(match).unflatten(-1, (cfg.max_level + 1, -1))  # (B, N, L, d)
        x = x + torch.gather(
            per_level, 2, levels[..., None, None].expand(-1, -1, 1, per_level.shape[-1])
        ).squeeze(2)
        for to_tail, to_ctx in self.stacks:
            tail = to_tail.reference(tail, x, ctx_pad)
            x = to_ctx.reference(x, tail, tail_pad)
        scores = self.head(self.ln_f(x)).squeeze(-1)  # (B, N)
        if cfg.match_skip:
            grouped = gid >= 0 if gid is not None else torch.zeros_like(levels, dtype=torch.bool)
            scores = scores + (self.match_skip[2 * levels + grouped.long()] * match).sum(
                -1
            )  # (B, N)
        if cfg.n_entry_features:
            scores = scores + direct
        if cfg.prior:
            scores = scores + self.prior_gain * batch["entry_features"][..., -1].to(scores.dtype)
        return torch.where(valid, scores, torch.zeros_like(scores))

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Inference: calibrated scores (raw x ``score_scale``) with illegal directions hard-masked
        (the allocator's own mask)."""
        can_expand = batch["expand_cost"] > 0
        can_collapse = batch["collapse_refund"] > 0
        return mask_illegal(self.forward(batch) * self.score_scale, can_expand, can_collapse)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
