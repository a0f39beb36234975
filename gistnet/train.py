"""Substitutability training of GistNet against the frozen LM (no LM weight changes).

A training example is a block-aligned window of text (``--text``: pydoc prose, plus the standard
library's source, ``gistnet/corpus.py``; train split only): ``ctx_blocks`` blocks of b tokens, then
H query tokens. Some blocks stand as gists and the LM reads the context with the gradient flowing
through the frozen LM into GistNet. Every gist of a batch comes from one batched LM-prefix call and
one GistNet call. Contexts follow the working-context invariants (a gist replaces exactly its block,
in order, slot positions) and come in three kinds, drawn per example:

* phase 1 (the first ``no_tail_steps``; afterwards with probability ``p_no_tail``): *no L0 tail* —
  every block is a gist, so the query can only be predicted through what the gists carry;
* random L0/L1 mixes with always a recent L0 tail (the last ``tail_blocks`` blocks), each older
  block L0 with probability ``p_l0``;
* with probability ``p_l2``: an L2 gist of the b blocks before the window (an L2 node = b L1 gists,
  themselves GistNet outputs) in front of the mix (needs b*b tokens of history).

The loss (``ObjectiveConfig``; every term logged as ``loss/<name>``): the query NLL; optionally the
KL from the full-context LM (teacher: the same LM reading the window's tokens, no gradient); a
contrastive hinge (the example's own gists against the gists of another window of the same corpus);
block reconstruction from its gist. The horizon follows the curriculum ``horizons`` (equal parts of
the run). On CUDA the LM's forwards run under bf16 autocast (``--amp``; GistNet, the output head and
the losses in float32). The same loop trains the *soft-prompt control* (``--kind softprompt``: free
vectors in the gist slots, ignoring the text). Validation, every ``eval_every`` steps, on fixed
windows of the *validation* split of each corpus (never the held-out text the benchmark reports
on; H = 32, 7 gists + a 32-token L0 block): NLL with the gists, with the gists of a window half the
corpus away (a content check: a gain that survives the swap is not compression; ``far_minus_own``
is the gap), with the context dropped, and with the full context. The export is the step with the
lowest validation gist NLL (``--select``). Usage: ``python -m gistnet.train --out DIR`` (``--help``
lists every option); ``scripts/gpu_gistnet_train.sh`` runs a full training on a GPU machine.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gistnet.gister import LMPrefix, load_gistnet, save_gistnet
from gistnet.model import GistNet, GistNetConfig, SoftPrompt
from megacontext.cli import parse, to_dict
from megacontext.training import LoopConfig, TrainLoop, load_checkpoint, resolve_device
from megacontext.tree import ConfigError


def _default_train() -> LoopConfig:
    return LoopConfig(
        lr=1e-3,
        warmup_steps=30,
        total_steps=400,
        eval_every=100,
        ckpt_every=200,
        batch_size=8,
        weight_decay=0.0,
    )


@dataclass(frozen=True)
class ObjectiveConfig:
    """GistNet's loss: weighted terms, each logged on its own (``loss/nll``, ``loss/kl``, ...)."""

    nll_weight: float = 1.0
    """Weight of the query NLL with the gists in context (substitutability)."""
    kl_weight: float = 0.0
    """Weight of KL(full-context LM || LM reading the gists) over the query's next-token
    distributions; the teacher is the same frozen LM reading the window's real tokens (no gradient;
    one more LM forward). 0 = off."""
    contrast_weight: float = 0.0
    """Weight of the contrastive hinge mean(relu(margin - (NLL_swapped - NLL_own))): an example's
    own gists must predict its query better than the gists of another window of the same corpus
    swapped into the same slots (one more LM forward and backward). 0 = off."""
    contrast_margin: float = 0.1
    """Margin of the contrastive hinge, in nats per query token."""
    recon_weight: float = 0.0
    """Weight of reconstruction: the NLL of each L1-gisted block's own tokens when the LM reads
    [that gist, the block's tokens], the first token predicted from the gist alone. 0 = off."""

    def __post_init__(self) -> None:
        weights = (self.nll_weight, self.kl_weight, self.contrast_weight, self.recon_weight)
        if min(weights) < 0 or not any(weights):
            raise ConfigError(f"objective weights must be >= 0 and not all 0, got {weights}")
        if self.contrast_margin < 0:
            raise ConfigError(f"contrast_margin must be >= 0, got {self.contrast_margin}")


@dataclass
class GistTrainArgs:
    """Train GistNet (or the soft-prompt control) by substitutability against the frozen LM."""

    out: str = "runs/gistnet"
    """Output directory: checkpoints, metrics.jsonl, the exported safetensors + card."""
    kind: Literal["gistnet", "softprompt"] = "gistnet"
    """What to train: GistNet, or the soft-prompt content control."""
    lm: str = "smollm2"
    """Frozen LM: 'smollm2', 'tiny' (random-init, tests) or a local model folder."""
    text: Literal["pydoc", "pydoc+stdlib"] = "pydoc+stdlib"
    """Training text (gistnet/corpus.py): pydoc prose, or prose plus the standard library's source.
    """
    code_share: float = 0.5
    """With pydoc+stdlib: chance that an example is drawn from the code (the rest from the prose).
    """
    ctx_blocks: int = 8
    """Blocks of context before the query."""
    tail_blocks: int = 1
    """Recent blocks always at L0 after phase 1."""
    p_l0: float = 0.15
    """After phase 1: chance that an older block stays L0."""
    p_l2: float = 0.15
    """After phase 1: chance that an example also carries an L2 gist of the b blocks before it."""
    no_tail_steps: int = 120
    """Phase 1: steps with no L0 tail (every block a gist)."""
    p_no_tail: float = 0.0
    """After phase 1: chance that an example still has no L0 tail (only the gists can predict the
    query)."""
    horizons: tuple[int, ...] = (32, 64)
    """Curriculum of H: equal parts of the run (e.g. 32 64 128; 128 roughly doubles the step time on
    a CPU)."""
    val_windows: int = 24
    """Validation windows per corpus (fixed; same for every evaluation; validation split, never
    held-out text)."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """bf16 autocast of the frozen LM's forwards ('auto': on CUDA only); GistNet, the output head
    and the losses stay float32."""
    select: Literal["best", "final"] = "best"
    """Exported weights: the lowest validation gist NLL (best.pt) or the last step."""
    export: str = ""
    """Also write the selected weights here (safetensors + JSON card), e.g.
    gistnet/checkpoints/gistnet-smollm2.safetensors."""
    resume: str = ""
    """Checkpoint to resume from (e.g. OUT/latest.pt)."""
    init: str = ""
    """GistNet weights to start from (an exported .safetensors, e.g. the shipped checkpoint; its
    sizes must match --model)."""
    progress: bool = True
    """Progress bar."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: GistNetConfig = field(default_factory=GistNetConfig)
    train: LoopConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        for name in ("code_share", "p_l0", "p_l2", "p_no_tail"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.horizons or min(self.horizons) < 1:
            raise ConfigError(f"horizons must be >= 1, got {self.horizons}")
        if self.init and self.kind != "gistnet":
            raise ConfigError(
                "--init starts a GistNet from exported weights; the soft prompt has none"
            )
        if not 1 <= self.tail_blocks <= self.ctx_blocks:
            raise ConfigError(
                f"tail_blocks must be in 1..ctx_blocks={self.ctx_blocks}, got {self.tail_blocks}"
            )


class TextBlocks:
    """Block-aligned token stream of one split: the named corpora one after another (each cut to
    whole blocks) as *segments* (block ranges), with the LM's embeddings and GistNet's L1 input
    features of any set of blocks computed in one batched call (memoised when ``cache``: only for
    the fixed validation windows; training windows rarely repeat)."""

    def __init__(
        self,
        ids: np.ndarray | dict[str, np.ndarray],
        lm,
        block_size: int,
        lm_layer: int,
        cache: bool = False,
        amp: bool = False,
    ) -> None:
        texts = ids if isinstance(ids, dict) else {"text": ids}
        self.b = b = block_size
        self.device = next(lm.parameters()).device
        parts, self.segments, at = [], {}, 0
        for name, t in texts.items():
            n = len(t) // b
            parts.append(np.asarray(t[: n * b], dtype=np.int64))
            self.segments[name] = (at, at + n)
            at += n
        self.n_blocks = at
        self.ids = torch.as_tensor(
            np.concatenate(parts) if parts else np.zeros(0, np.int64), device=self.device
        )
        self.embed = lm.get_input_embeddings()
        self.prefix = LMPrefix(lm, lm_layer, autocast=amp) if lm_layer > 0 else None
        self.cache = cache
        self._feats: dict[int, Tensor] = {}

    def tokens(self, block: int, n: int) -> Tensor:
        return self.ids[block * self.b : block * self.b + n]

    @torch.no_grad()
    def embeddings(self, block: int, n_blocks: int) -> Tensor:
        """(n_blocks, b, d) token embeddings of consecutive blocks."""
        return self.block_embeddings(torch.arange(block, block + n_blocks))

    @torch.no_grad()
    def block_embeddings(self, blocks: Tensor) -> Tensor:
        """(n, b, d) float32 token embeddings of the given blocks (any order, repeats allowed)."""
        if len(blocks) and (int(blocks.min()) < 0 or int(blocks.max()) >= self.n_blocks):
            raise IndexError(f"blocks outside 0..{self.n_blocks - 1}")
        ids = self.ids.view(self.n_blocks, self.b)[blocks.to(self.device)]  # (n, b)
        return self.embed(ids).float()

    def features(self, blocks: Tensor | list[int], chunk: int = 1024) -> Tensor:
        """(n, b, d) GistNet L1 input of the given blocks: the LM prefix features of each block."""
        blocks = torch.as_tensor(blocks, dtype=torch.long)
        if self.prefix is None:
            return self.block_embeddings(blocks)
        todo = blocks
        if self.cache:
            todo = torch.as_tensor(
                sorted({j for j in blocks.tolist() if j not in self._feats}), dtype=torch.long
            )
        feats = [
            self.prefix(self.block_embeddings(todo[s : s + chunk]))
            for s in range(0, len(todo), chunk)
        ]
        if not self.cache:
            return (
                torch.cat(feats)
                if feats
                else torch.zeros(0, self.b, self.embed.embedding_dim, device=self.device)
            )
        for j, f in zip(todo.tolist(), (f for part in feats for f in part), strict=True):
            self._feats[j] = f
        return torch.stack([self._feats[j] for j in blocks.tolist()])


@dataclass
class Example:
    """One context: per block of the window, 'L0' or 'L1'; optionally an L2 gist in front.
    ``negative_start``: the window whose gists the contrastive term swaps in (same length)."""

    start_block: int
    layout: list[str]
    horizon: int
    l2: bool = False
    negative_start: int | None = None


class Substitution:
    """Builds the LM inputs of a batch of examples (every gist of the batch from one batched
    GistNet call) and returns the query logits, NLLs and the reconstruction NLL.

    Contexts follow slot positions (position = index in the sequence); the LM forward runs under
    bf16 autocast when ``amp`` (CUDA), the output head in float32 (NLL and KL stay exact)."""

    def __init__(
        self,
        lm,
        blocks: TextBlocks,
        gistnet: GistNet | None = None,
        soft: SoftPrompt | None = None,
        amp: bool = False,
    ) -> None:
        self.lm, self.blocks = lm, blocks
        self.decoder, self.head = lm.base_model, lm.get_output_embeddings()
        self.gistnet, self.soft = gistnet, soft
        self.device = next(lm.parameters()).device
        self.dtype = next(lm.parameters()).dtype
        self.amp = amp
        self.lm_tokens = 0  # tokens through the full LM (throughput)

    # ------------------------------------------------------------------ gists
    def l1_gists(self, blocks: Tensor) -> Tensor:
        """(n, d) L1 gists of the given blocks (one LM prefix call, one GistNet call)."""
        blocks = torch.as_tensor(blocks, dtype=torch.long)
        return self.gistnet(self.blocks.features(blocks), self.blocks.block_embeddings(blocks), 1)

    def l2_gists(self, starts: Tensor) -> Tensor:
        """(n, d) L2 gists of the nodes whose b blocks start at ``starts``."""
        b = self.blocks.b
        starts = torch.as_tensor(starts, dtype=torch.long)
        children = self.l1_gists((starts[:, None] + torch.arange(b)).reshape(-1)).reshape(
            len(starts), b, -1
        )
        return self.gistnet(children, children, 2)

    def gists(self, start: int, n: int, level: int = 1) -> Tensor:
        """(n, d) gists of ``n`` consecutive nodes of ``level`` from block ``start`` (L2: b blocks
        each)."""
        if level == 1:
            return self.l1_gists(torch.arange(start, start + n))
        return self.l2_gists(start + self.blocks.b * torch.arange(n))

    # ------------------------------------------------------------------ contexts
    def contexts(self, examples: list[Example], swap_from: list[int] | None = None) -> list[Tensor]:
        """Per example, its context embeddings (N_i, d). ``swap_from``: each example's gists come
        from the blocks of another window starting there (the far-window control); tokens stay its
        own."""
        b = self.blocks.b
        tok_blocks, l1_src, l2_src, plan = [], [], [], []
        for i, ex in enumerate(examples):  # plan: per example, a list of (pool, index) per slot
            src = ex.start_block if swap_from is None else swap_from[i]
            slots: list[tuple[str, int]] = []
            n_gist = 0
            if ex.l2:
                slots.append(("soft", n_gist) if self.soft is not None else ("l2", len(l2_src)))
                l2_src.append(src - b)
                n_gist += 1
            for j, kind in enumerate(ex.layout):
                if kind == "L0":
                    slots.append(("tok", len(tok_blocks)))
                    tok_blocks.append(ex.start_block + j)
                elif self.soft is not None:
                    slots.append(("soft", n_gist))
                    n_gist += 1
                else:
                    slots.append(("l1", len(l1_src)))
                    l1_src.append(src + j)
            plan.append(slots)
        d = self.blocks.embed.embedding_dim
        pools = {"tok": self.blocks.block_embeddings(torch.as_tensor(tok_blocks, dtype=torch.long))}
        if self.soft is not None:
            pools["soft"] = self.soft(
                max((s[1] + 1 for p in plan for s in p if s[0] == "soft"), default=0)
            )
        else:
            pools["l1"] = (
                self.l1_gists(torch.as_tensor(l1_src, dtype=torch.long)) if l1_src else None
            )
            pools["l2"] = (
                self.l2_gists(torch.as_tensor(l2_src, dtype=torch.long)) if l2_src else None
            )
        out = []
        for slots in plan:
            parts = [pools[k][j] if k == "tok" else pools[k][j : j + 1] for k, j in slots]
            out.append(torch.cat(parts) if parts else torch.zeros(0, d, device=self.device))
        return out

    def sequence(self, ex: Example, swap_from: int | None = None) -> tuple[Tensor, Tensor]:
        """(context embeddings (N, d), query ids (H,)) of one example."""
        ctx = self.contexts([ex], None if swap_from is None else [swap_from])[0]
        return ctx, self.query(ex)

    def query(self, ex: Example) -> Tensor:
        return self.blocks.tokens(ex.start_block + len(ex.layout), ex.horizon)

    # ------------------------------------------------------------------ the frozen LM
    def query_logits(self, contexts: list[Tensor], queries: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(logits (B, H, V) float32, targets (B, H) with -100 where a query is shorter): the LM
        reads
        ``[context_i | query_i]``; position n_i - 1 + t predicts query token t."""
        q_emb = [self.blocks.embed(q.to(self.device)).float() for q in queries]
        rows = [torch.cat([c.float(), e]) for c, e in zip(contexts, q_emb, strict=True)]
        lengths = torch.tensor([r.shape[0] for r in rows], device=self.device)
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, L, d), zero padding
        bsz, length = embeds.shape[:2]
        mask = (torch.arange(length, device=self.device)[None] < lengths[:, None]).long()
        pos = torch.arange(length, device=self.device)[None].expand(bsz, -1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            hidden = self.decoder(
                inputs_embeds=embeds.to(self.dtype),
                position_ids=pos,
                attention_mask=mask,
                use_cache=False,
            ).last_hidden_state
        self.lm_tokens += int(lengths.sum())
        h = max(q.shape[0] for q in queries)
        n_ctx = torch.tensor([c.shape[0] for c in contexts], device=self.device)
        at = (n_ctx[:, None] - 1 + torch.arange(h, device=self.device)).clamp(
            0, length - 1
        )  # (B, H)
        targets = torch.full((bsz, h), -100, dtype=torch.long, device=self.device)
        for i, q in enumerate(queries):
            targets[i, : q.shape[0]] = q.to(self.device)
        picked = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, H, d)
        return self.head(
            picked.to(self.head.weight.dtype)
        ).float(), targets  # head outside autocast

    def logits(
        self, examples: list[Example], swap_from: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.query_logits(
            self.contexts(examples, swap_from), [self.query(ex) for ex in examples]
        )

    @torch.no_grad()
    def teacher_logits(self, examples: list[Example]) -> tuple[Tensor, Tensor]:
        """The full-context teacher: the same frozen LM reading each window's real tokens (every
        block L0; an L2 history is not read: it would cost b*b more tokens per example)."""
        full = [Example(ex.start_block, ["L0"] * len(ex.layout), ex.horizon) for ex in examples]
        return self.logits(full)

    def nll(self, examples: list[Example], swap_from: list[int] | None = None) -> Tensor:
        """(B,) mean NLL of each example's query tokens (next-token labels, slot positions)."""
        return token_nll(*self.logits(examples, swap_from))

    def recon_nll(self, examples: list[Example]) -> Tensor:
        """(n,) reconstruction NLL of every L1-gisted block of the examples: the LM reads
        ``[gist, the block's tokens]`` and predicts the block's tokens (the first from the gist)."""
        blocks = torch.as_tensor(
            [ex.start_block + j for ex in examples for j, k in enumerate(ex.layout) if k == "L1"],
            dtype=torch.long,
        )
        if not len(blocks) or self.gistnet is None:
            return torch.zeros(0, device=self.device)
        gists = self.l1_gists(blocks)  # (n, d)
        ids = self.blocks.ids.view(self.blocks.n_blocks, self.blocks.b)[
            blocks.to(self.device)
        ]  # (n, b)
        return token_nll(*self.query_logits([g[None] for g in gists], list(ids)))


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(B,) mean cross-entropy per row over the targets that are not -100."""
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    valid = (targets != -100).float()
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1)


def token_kl(teacher: Tensor, student: Tensor, targets: Tensor) -> Tensor:
    """(B,) mean over valid positions of KL(teacher || student) of the next-token distributions."""
    lt, ls = teacher.float().log_softmax(-1), student.float().log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)  # (B, H)
    valid = (targets != -100).float()
    return (kl * valid).sum(1) / valid.sum(1).clamp_min(1)


def fixed_windows(
    n_blocks: int,
    ctx_blocks: int,
    horizon: int,
    count: int,
    seed: int,
    min_start: int = 0,
    block_size: int = 32,
) -> list[int]:
    """Seeded, distinct block-aligned window starts with room for the context and the query."""
    hi = n_blocks - ctx_blocks - (horizon + block_size - 1) // block_size - 1
    if hi <= min_start:
        raise ConfigError(
            f"the text has {n_blocks} blocks: too short for {ctx_blocks}-block windows"
        )
    rng = np.random.default_rng([seed, 4242])
    return sorted(
        rng.choice(
            np.arange(min_start, hi), size=min(count, hi - min_start), replace=False
        ).tolist()
    )


def far_starts(starts: list[int], n_blocks: int, ctx_blocks: int) -> list[int]:
    """For each window, a window half the text away (another topic), same length."""
    span = n_blocks - ctx_blocks - 8
    return [int((s + span // 2) % span) for s in starts]


def training_texts(tokenizer, text: str, split: str, vocab_size: int) -> dict[str, np.ndarray]:
    """The named corpora of one split. Without a tokenizer (the tiny test LM), seeded random ids
    stand in for each corpus (train 40k tokens each, other splits 12k)."""
    names = ["pydoc"] if text == "pydoc" else ["pydoc", "stdlib"]
    if tokenizer is None:
        n = 40_000 if split == "train" else 12_000
        return {
            c: np.random.default_rng([i, len(split)]).integers(0, vocab_size, n)
            for i, c in enumerate(names)
        }
    from gistnet.corpus import corpus_token_ids

    return {c: corpus_token_ids(tokenizer, c, split) for c in names}


class GistTrainer(TrainLoop):
    desc = "train gistnet"

    def __init__(self, args: GistTrainArgs, lm, tokenizer) -> None:
        self.args = args
        cfg, b = args.model, args.model.block_size
        device = resolve_device(args.train.device)
        amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
        if amp and device.type == "cpu":
            raise ConfigError(
                "amp='bf16' needs CUDA (bf16 is several times slower than fp32 on CPUs)"
            )
        v = lm.get_input_embeddings().num_embeddings
        self.train_text = TextBlocks(
            training_texts(tokenizer, args.text, "train", v), lm, b, cfg.lm_layer, amp=amp
        )
        self.val_text = TextBlocks(
            training_texts(tokenizer, args.text, "validation", v),
            lm,
            b,
            cfg.lm_layer,
            cache=True,
            amp=amp,
        )
        torch.manual_seed(args.train.seed)
        with torch.no_grad():  # running-text statistics from the prose (and code) the run trains on
            text_emb = self.train_text.embed(self.train_text.ids[:200_000])
        if args.kind == "gistnet":
            model = GistNet.for_lm(cfg, text_emb).to(device)
            if args.init:  # weights and the running-text statistics of an earlier export
                start = load_gistnet(args.init, device)
                if start.config != cfg:
                    raise ConfigError(
                        f"--init {args.init}: its config {start.config} differs from --model {cfg}"
                    )
                model.load_state_dict(start.state_dict())
            self.sub = Substitution(lm, self.train_text, gistnet=model, amp=amp)
            self.val_sub = Substitution(lm, self.val_text, gistnet=model, amp=amp)
        else:
            gn = GistNet.for_lm(cfg, text_emb)
            model = SoftPrompt(args.ctx_blocks + 1, gn.centre, float(gn.sigma), args.train.seed).to(
                device
            )
            self.sub = Substitution(lm, self.train_text, soft=model, amp=amp)
            self.val_sub = Substitution(lm, self.val_text, soft=model, amp=amp)
        self.amp = amp
        model_config = {"kind": args.kind, **cfg.to_dict(), "ctx_blocks": args.ctx_blocks}
        super().__init__(model, model_config, args.train, args.out, args.progress)
        self.min_l2_start = b  # an L2 gist needs the b blocks before the window
        self.min_gap = (
            args.ctx_blocks + b + (max(args.horizons) + b - 1) // b + 1
        )  # negatives never overlap
        for name, (lo, hi) in self.train_text.segments.items():
            if hi - lo < 4 * self.min_gap:
                raise ConfigError(
                    f"training text {name!r} has {hi - lo} blocks: too short for "
                    f"{args.ctx_blocks}-block windows with L2 history and negatives"
                )
        self.val_starts: dict[str, list[int]] = {}
        self.val_far: dict[str, list[int]] = {}
        for name, (lo, hi) in self.val_text.segments.items():
            starts = fixed_windows(
                hi - lo, args.ctx_blocks, 32, args.val_windows, args.train.seed, block_size=b
            )
            self.val_starts[name] = [lo + s for s in starts]
            self.val_far[name] = [lo + s for s in far_starts(starts, hi - lo, args.ctx_blocks)]
        self._baselines: dict | None = None

    def horizon(self, step: int) -> int:
        hs = self.args.horizons
        return hs[min(len(hs) - 1, step * len(hs) // self.config.total_steps)]

    def batch(self, step: int) -> list[Example]:
        """The examples of ``step`` (derived from (seed, step)): layouts and starts from one stream,
        the corpus, the no-tail draw and the contrastive negative from a second."""
        a, b = self.args, self.args.model.block_size
        rng = np.random.default_rng([self.config.seed, step, 77])
        rng2 = np.random.default_rng([self.config.seed, step, 78])
        h = self.horizon(step)
        segments = list(self.train_text.segments.values())
        q_blocks = (h + b - 1) // b
        out = []
        for _ in range(self.config.batch_size):
            lo, hi = segments[int(len(segments) > 1 and rng2.random() < a.code_share)]
            hi = hi - a.ctx_blocks - q_blocks - 1
            l2 = step >= a.no_tail_steps and rng.random() < a.p_l2
            start = int(rng.integers(lo + (self.min_l2_start if l2 else 0), hi))
            if step < a.no_tail_steps or rng2.random() < a.p_no_tail:
                layout = ["L1"] * a.ctx_blocks
                if step >= a.no_tail_steps:  # keep the main stream's draws the same either way
                    rng.random(a.ctx_blocks - a.tail_blocks)
            else:
                layout = [
                    "L0" if rng.random() < a.p_l0 else "L1"
                    for _ in range(a.ctx_blocks - a.tail_blocks)
                ]
                layout += ["L0"] * a.tail_blocks
            neg = start
            while abs(neg - start) < self.min_gap:
                neg = int(rng2.integers(lo + self.min_l2_start, hi))
            out.append(Example(start, layout, h, l2, neg))
        return out

    def loss(self, batch: list[Example]) -> tuple[Tensor, dict[str, float]]:
        o = self.args.objective
        logits, targets = self.sub.logits(batch)
        nll = token_nll(logits, targets)  # (B,)
        total = o.nll_weight * nll.mean()
        terms = {"loss/nll": nll.mean().item()}
        if o.kl_weight > 0:
            teacher, _ = self.sub.teacher_logits(batch)
            kl = token_kl(teacher, logits, targets).mean()
            total = total + o.kl_weight * kl
            terms["loss/kl"] = kl.item()
        del logits
        if o.contrast_weight > 0:
            swapped = self.sub.nll(batch, [ex.negative_start for ex in batch])
            gap = swapped - nll  # > 0: own gists predict better
            hinge = torch.relu(o.contrast_margin - gap).mean()
            total = total + o.contrast_weight * hinge
            terms["loss/contrast"], terms["loss/contrast_gap"] = hinge.item(), gap.mean().item()
        if o.recon_weight > 0:
            rec = self.sub.recon_nll(batch)
            if len(rec):
                total = total + o.recon_weight * rec.mean()
                terms["loss/recon"] = rec.mean().item()
        terms["loss/total"] = total.item()
        terms["data/horizon"] = batch[0].horizon
        return total, terms

    @torch.no_grad()
    def validate(self) -> dict:
        """Per corpus of the validation split (``val/<corpus>/...``) and pooled (``val/...``): the
        gist NLL (7 gists + 1 L0 block, H = 32), the far-window swap, their gap, full and dropped.
        """
        a = self.args
        layout = ["L1"] * (a.ctx_blocks - 1) + ["L0"]
        rows: dict[str, list[Tensor]] = {"nll_gist": [], "nll_far_window": []}
        res: dict[str, float] = {}
        for name, starts in self.val_starts.items():
            exs = [Example(s, layout, 32) for s in starts]
            gist = self._chunked(self.val_sub.nll, exs)
            rows["nll_gist"].append(gist)
            res[f"val/{name}/nll_gist"] = float(gist.mean())
            if a.kind == "gistnet":
                far = self._chunked(self.val_sub.nll, exs, self.val_far[name])
                rows["nll_far_window"].append(far)
                res[f"val/{name}/nll_far_window"] = float(far.mean())
                res[f"val/{name}/far_minus_own"] = float((far - gist).mean())
        res["val/nll_gist"] = float(torch.cat(rows["nll_gist"]).mean())
        if a.kind == "gistnet":
            res["val/nll_far_window"] = float(torch.cat(rows["nll_far_window"]).mean())
            res["val/far_minus_own"] = res["val/nll_far_window"] - res["val/nll_gist"]
        if self._baselines is None:  # fixed: computed once
            base: dict[str, list[Tensor]] = {"full": [], "dropped": []}
            self._baselines = {}
            for name, starts in self.val_starts.items():
                full = self._chunked(
                    self.val_sub.nll, [Example(s, ["L0"] * a.ctx_blocks, 32) for s in starts]
                )
                dropped = self._chunked(
                    self.val_sub.nll, [Example(s + a.ctx_blocks - 1, ["L0"], 32) for s in starts]
                )
                base["full"].append(full)
                base["dropped"].append(dropped)
                self._baselines[f"val/{name}/nll_full"] = float(full.mean())
                self._baselines[f"val/{name}/nll_dropped"] = float(dropped.mean())
            self._baselines["val/nll_full"] = float(torch.cat(base["full"]).mean())
            self._baselines["val/nll_dropped"] = float(torch.cat(base["dropped"]).mean())
        res.update(self._baselines)
        res["val/loss"] = res["val/nll_gist"]
        return res

    def perf(self, elapsed: float) -> dict:
        tokens, self.sub.lm_tokens = self.sub.lm_tokens, 0
        return {"perf/lm_tokens_per_s": tokens / elapsed if elapsed > 0 else None}

    def _chunked(self, fn, exs, extra=None, size: int = 8) -> Tensor:
        outs = []
        for s in range(0, len(exs), size):
            outs.append(
                fn(exs[s : s + size])
                if extra is None
                else fn(exs[s : s + size], extra[s : s + size])
            )
        return torch.cat(outs).cpu()


def main(argv: list[str] | None = None) -> None:
    from gistnet.corpus import corpus_card
    from gistnet.gister import lm_fingerprint
    from megacontext.lm import load_lm

    args = parse(GistTrainArgs, argv)
    if not args.progress:  # transformers' own loading bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # float32 weights everywhere; on CUDA the LM's forwards run under bf16 autocast (--amp)
    lm, tok = load_lm(args.lm, device=args.train.device, dtype=torch.float32)
    if next(lm.parameters()).device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args = replace(args, model=replace(args.model, d_model=int(lm.config.hidden_size)))
    t0 = time.perf_counter()
    trainer = GistTrainer(args, lm, tok)
    if args.resume:
        trainer.resume(args.resume)
    result = trainer.train()
    print(json.dumps(result, indent=1))
    if not args.export:
        return
    selected = {"select": "final", "step": trainer.step, "validation": result}
    best = trainer.out / "best.pt"
    if args.select == "best" and best.exists():
        ckpt = load_checkpoint(best, trainer.device)
        trainer.model.load_state_dict(ckpt["model"])
        val = [
            json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()
        ]
        at = {r["step"]: r for r in val if "val/loss" in r}
        selected = {
            "select": "best",
            "step": ckpt["step"],
            "validation": {
                k: v for k, v in at.get(ckpt["step"], {}).items() if k.startswith("val/")
            },
        }
    card = {
        "command": " ".join(["python -m gistnet.train", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.train.seed,
        "steps": trainer.step,
        "lm": args.lm,
        "lm_fingerprint": lm_fingerprint(lm),
        "data": f"{args.text}: train split; validation (checkpoint choice) from the validation "
        "split, disjoint from every held-out set (gistnet/corpus.py)",
        "corpus": corpus_card()
        if tok is not None
        else {"python": platform.python_version(), "text": "random ids"},
        "tokens": {
            split: {name: (hi - lo) * text.b for name, (lo, hi) in text.segments.items()}
            for split, text in (("train", trainer.train_text), ("validation", trainer.val_text))
        },
        "device": torch.cuda.get_device_name(0) if trainer.device.type == "cuda" else "cpu",
        "amp_bf16": trainer.amp,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "train_args": to_dict(args),
        "selected": selected,
        "last_validation": result,
        "train_seconds": time.perf_counter() - t0,
    }
    if args.kind == "gistnet":
        card["params"] = trainer.model.n_params()
        print(f"exported {save_gistnet(trainer.model, args.export, card)}")
    else:  # the soft-prompt control: its vectors and the same card
        path = Path(args.export)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vectors": trainer.model.vectors.detach().cpu(), "card": card}, path)
        path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
        print(f"exported {path}")


if __name__ == "__main__":
    main()
