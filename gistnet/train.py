"""Substitutability training of GistNet against the frozen LM (no LM weight changes).

A training example is a block-aligned window of pydoc text (training topics only): ``ctx_blocks``
blocks of b tokens, then H query tokens. Some blocks stand as gists and the loss is the LM's NLL of
the query tokens given that context, with the gradient flowing through the frozen LM into GistNet.
Contexts follow the working-context invariants (a gist replaces exactly its block, in order, slot
positions) and come in three kinds, drawn per example:

* phase 1 (the first ``no_tail_steps``): *no L0 tail* — every block is a gist, so the query can only
  be predicted through what the gists carry (the anti-soft-prompt phase);
* then random L0/L1 mixes with always a recent L0 tail (the last ``tail_blocks`` blocks), each older
  block L0 with probability ``p_l0``;
* with probability ``p_l2``: an L2 gist of the b blocks before the window (an L2 node = b L1 gists,
  themselves GistNet outputs) in front of the mix (needs b*b tokens of history).

The horizon follows the curriculum ``horizons`` (equal parts of the run; default 32 -> 64, and
``--horizons 32 64 128`` for the full curriculum, which costs about twice the CPU time per step at
H = 128). The defaults train in about 40 minutes on a 2-core CPU (about 5-7 s a step).
The same loop trains the *soft-prompt control* (``--kind softprompt``: free vectors in the gist
slots, ignoring the text). Validation, every ``eval_every`` steps on fixed held-out windows of the
held-out topics (H = 32, 7 gists + a 32-token L0 block): NLL with the gists, with the gists of a
far-away window of another topic (a content check: a gain that survives the swap is not
compression), with the context dropped, and with the full context.
Usage: ``python -m gistnet.train --out DIR`` (``--help`` lists every option).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gistnet.gister import LMPrefix, save_gistnet
from gistnet.model import GistNet, GistNetConfig, SoftPrompt
from lensnet.train import TrainConfig, TrainLoop, resolve_device
from sim.cli import parse, to_dict
from sim.tree import ConfigError


def _default_train() -> TrainConfig:
    return TrainConfig(lr=1e-3, warmup_steps=30, total_steps=400, eval_every=100, ckpt_every=200, batch_size=8,
                       weight_decay=0.0)


@dataclass
class GistTrainArgs:
    """Train GistNet (or the soft-prompt control) by substitutability against the frozen LM."""

    out: str = "runs/gistnet"
    """Output directory: checkpoints, metrics.jsonl, the exported safetensors + card."""
    kind: Literal["gistnet", "softprompt"] = "gistnet"
    """What to train: GistNet, or the soft-prompt content control."""
    lm: str = "smollm2"
    """Frozen LM: 'smollm2', 'tiny' (random-init, tests) or a local model folder."""
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
    horizons: tuple[int, ...] = (32, 64)
    """Curriculum of H: equal parts of the run (e.g. 32 64 128; 128 roughly doubles the step time on a CPU)."""
    val_windows: int = 24
    """Held-out windows for validation (fixed; same for every evaluation)."""
    export: str = ""
    """Also write the final weights here (safetensors + JSON card), e.g. gistnet/checkpoints/gistnet-smollm2.safetensors."""
    resume: str = ""
    """Checkpoint to resume from (e.g. OUT/latest.pt)."""
    progress: bool = True
    """Progress bar."""
    model: GistNetConfig = field(default_factory=GistNetConfig)
    train: TrainConfig = field(default_factory=_default_train)


class TextBlocks:
    """Block-aligned token stream of one pydoc split, with the LM's embeddings and (memoised) the
    GistNet features of every block."""

    def __init__(self, ids: np.ndarray, lm, block_size: int, lm_layer: int) -> None:
        self.b = block_size
        self.n_blocks = len(ids) // block_size
        self.ids = torch.as_tensor(ids[: self.n_blocks * block_size], dtype=torch.long)
        self.embed = lm.get_input_embeddings()
        self.device = next(lm.parameters()).device
        self.prefix = LMPrefix(lm, lm_layer) if lm_layer > 0 else None
        self._feats: dict[int, Tensor] = {}

    def tokens(self, block: int, n: int) -> Tensor:
        return self.ids[block * self.b : block * self.b + n]

    @torch.no_grad()
    def embeddings(self, block: int, n_blocks: int) -> Tensor:
        """(n_blocks, b, d) token embeddings of consecutive blocks."""
        ids = self.tokens(block, n_blocks * self.b).to(self.device)
        return self.embed(ids).float().reshape(n_blocks, self.b, -1)

    def features(self, blocks: list[int]) -> Tensor:
        """(n, b, d) GistNet L1 input of the given blocks (LM prefix features, computed once each)."""
        if self.prefix is None:
            return torch.cat([self.embeddings(j, 1) for j in blocks])
        todo = sorted({j for j in blocks if j not in self._feats})
        for s in range(0, len(todo), 64):
            chunk = todo[s : s + 64]
            feats = self.prefix(torch.cat([self.embeddings(j, 1) for j in chunk]))
            for j, f in zip(chunk, feats, strict=True):
                self._feats[j] = f
        return torch.stack([self._feats[j] for j in blocks])


@dataclass
class Example:
    """One context: per block of the window, 'L0' or 'L1'; optionally an L2 gist in front."""

    start_block: int
    layout: list[str]
    horizon: int
    l2: bool = False


class Substitution:
    """Builds the LM input of a batch of examples and returns the mean NLL of the query tokens."""

    def __init__(self, lm, blocks: TextBlocks, gistnet: GistNet | None = None, soft: SoftPrompt | None = None) -> None:
        self.lm, self.blocks = lm, blocks
        self.decoder, self.head = lm.base_model, lm.get_output_embeddings()
        self.gistnet, self.soft = gistnet, soft
        self.device = next(lm.parameters()).device
        self.dtype = next(lm.parameters()).dtype

    def gists(self, start: int, n: int, level: int = 1) -> Tensor:
        """(n, d) gists of ``n`` consecutive nodes of ``level`` from block ``start`` (L2: b blocks each)."""
        b = self.blocks.b
        if level == 1:
            blocks = list(range(start, start + n))
            return self.gistnet(self.blocks.features(blocks).to(self.device), self.blocks.embeddings(start, n), 1)
        children = self.gists(start, n * b, 1).reshape(n, b, -1)
        return self.gistnet(children, children, 2)

    def sequence(self, ex: Example, swap_from: int | None = None) -> tuple[Tensor, Tensor]:
        """(context embeddings (N, d), query ids (H,)). ``swap_from``: gists come from the blocks of
        another window starting there (the far-window control); tokens stay the window's own."""
        b = self.blocks.b
        parts: list[Tensor] = []
        n_gist = 0
        if ex.l2:
            src = (swap_from if swap_from is not None else ex.start_block) - b
            parts.append(self.gists(src, 1, 2) if self.soft is None else self.soft(1))
            n_gist += 1
        tok = self.blocks.embeddings(ex.start_block, len(ex.layout))
        for i, kind in enumerate(ex.layout):
            if kind == "L0":
                parts.append(tok[i])
            elif self.soft is not None:
                parts.append(self.soft(n_gist + 1)[n_gist : n_gist + 1])
                n_gist += 1
            else:
                src = (swap_from if swap_from is not None else ex.start_block) + i
                parts.append(self.gists(src, 1, 1))
                n_gist += 1
        query = self.blocks.tokens(ex.start_block + len(ex.layout), ex.horizon)
        return torch.cat(parts), query

    def nll(self, examples: list[Example], swap_from: list[int] | None = None) -> Tensor:
        """(B,) mean NLL of each example's query tokens (next-token labels, slot positions)."""
        seqs, queries = zip(*(self.sequence(ex, None if swap_from is None else swap_from[i])
                              for i, ex in enumerate(examples)), strict=True)
        q_emb = [self.blocks.embed(q.to(self.device)).float() for q in queries]
        rows = [torch.cat([s, e]) for s, e in zip(seqs, q_emb, strict=True)]
        length = max(r.shape[0] for r in rows)
        d = rows[0].shape[1]
        embeds = torch.zeros(len(rows), length, d, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        pos = torch.arange(length, device=self.device)[None].expand(len(rows), -1)
        hidden = self.decoder(inputs_embeds=embeds.to(self.dtype), position_ids=pos, attention_mask=mask,
                              use_cache=False).last_hidden_state
        out = []
        for i, (s, q) in enumerate(zip(seqs, queries, strict=True)):
            n = s.shape[0]
            logits = self.head(hidden[i, n - 1 : n - 1 + q.shape[0]]).float()  # position n-1 predicts query 0
            out.append(torch.nn.functional.cross_entropy(logits, q.to(self.device)))
        return torch.stack(out)


def fixed_windows(n_blocks: int, ctx_blocks: int, horizon: int, count: int, seed: int, min_start: int = 0) -> list[int]:
    """Seeded, distinct block-aligned window starts with room for the context and the query."""
    hi = n_blocks - ctx_blocks - (horizon + 31) // 32 - 1
    if hi <= min_start:
        raise ConfigError(f"the text has {n_blocks} blocks: too short for {ctx_blocks}-block windows")
    rng = np.random.default_rng([seed, 4242])
    return sorted(rng.choice(np.arange(min_start, hi), size=min(count, hi - min_start), replace=False).tolist())


def far_starts(starts: list[int], n_blocks: int, ctx_blocks: int) -> list[int]:
    """For each window, a window half the text away (another topic), same length."""
    span = n_blocks - ctx_blocks - 8
    return [int((s + span // 2) % span) for s in starts]


class GistTrainer(TrainLoop):
    desc = "train gistnet"

    def __init__(self, args: GistTrainArgs, lm, tokenizer) -> None:
        from sim.lm import pydoc_token_ids

        self.args = args
        cfg = args.model
        device = resolve_device(args.train.device)
        if tokenizer is None:  # the tiny test LM: random ids stand in for text
            rng = np.random.default_rng(0)
            v = lm.get_input_embeddings().num_embeddings
            train_ids, held_ids = rng.integers(0, v, 40_000), rng.integers(0, v, 20_000)
        else:
            train_ids, held_ids = pydoc_token_ids(tokenizer, "train"), pydoc_token_ids(tokenizer, "heldout")
        self.train_text = TextBlocks(train_ids, lm, cfg.block_size, cfg.lm_layer)
        self.held_text = TextBlocks(held_ids, lm, cfg.block_size, cfg.lm_layer)
        torch.manual_seed(args.train.seed)
        with torch.no_grad():
            text_emb = lm.get_input_embeddings()(self.train_text.ids.to(self.train_text.device))
        if args.kind == "gistnet":
            model = GistNet.for_lm(cfg, text_emb).to(device)
            self.sub = Substitution(lm, self.train_text, gistnet=model)
            self.val_sub = Substitution(lm, self.held_text, gistnet=model)
        else:
            gn = GistNet.for_lm(cfg, text_emb)
            model = SoftPrompt(args.ctx_blocks + 1, gn.centre, float(gn.sigma), args.train.seed).to(device)
            self.sub = Substitution(lm, self.train_text, soft=model)
            self.val_sub = Substitution(lm, self.held_text, soft=model)
        model_config = {"kind": args.kind, **cfg.to_dict(), "ctx_blocks": args.ctx_blocks}
        super().__init__(model, model_config, args.train, args.out, args.progress)
        b = cfg.block_size
        self.min_l2_start = b  # an L2 gist needs the b blocks before the window
        self.val_starts = fixed_windows(self.held_text.n_blocks, args.ctx_blocks, 32, args.val_windows,
                                        args.train.seed, min_start=b)
        self.val_far = far_starts(self.val_starts, self.held_text.n_blocks, args.ctx_blocks)
        self._baselines: dict | None = None

    def horizon(self, step: int) -> int:
        hs = self.args.horizons
        return hs[min(len(hs) - 1, step * len(hs) // self.config.total_steps)]

    def batch(self, step: int) -> list[Example]:
        a, b = self.args, self.args.model.block_size
        rng = np.random.default_rng([self.config.seed, step, 77])
        h = self.horizon(step)
        hi = self.train_text.n_blocks - a.ctx_blocks - (h + b - 1) // b - 1
        out = []
        for _ in range(self.config.batch_size):
            l2 = step >= a.no_tail_steps and rng.random() < a.p_l2
            start = int(rng.integers(self.min_l2_start if l2 else 0, hi))
            if step < a.no_tail_steps:
                layout = ["L1"] * a.ctx_blocks
            else:
                layout = ["L0" if rng.random() < a.p_l0 else "L1" for _ in range(a.ctx_blocks - a.tail_blocks)]
                layout += ["L0"] * a.tail_blocks
            out.append(Example(start, layout, h, l2))
        return out

    def loss(self, batch: list[Example]) -> tuple[Tensor, dict[str, float]]:
        nll = self.sub.nll(batch).mean()
        return nll, {"loss/nll": nll.item(), "data/horizon": batch[0].horizon}

    @torch.no_grad()
    def validate(self) -> dict:
        a = self.args
        layout = ["L1"] * (a.ctx_blocks - 1) + ["L0"]
        exs = [Example(s, layout, 32) for s in self.val_starts]
        res = {"val/nll_gist": float(self._chunked(self.val_sub.nll, exs).mean())}
        if a.kind == "gistnet":
            far = self._chunked(lambda e, f=None: self.val_sub.nll(e, f), exs, self.val_far)
            res["val/nll_far_window"] = float(far.mean())
        if self._baselines is None:  # fixed: computed once
            full = self._chunked(self.val_sub.nll, [Example(s, ["L0"] * a.ctx_blocks, 32) for s in self.val_starts])
            dropped = self._chunked(self.val_sub.nll, [Example(s + a.ctx_blocks - 1, ["L0"], 32) for s in self.val_starts])
            self._baselines = {"val/nll_full": float(full.mean()), "val/nll_dropped": float(dropped.mean())}
        res.update(self._baselines)
        res["val/loss"] = res["val/nll_gist"]
        return res

    def _chunked(self, fn, exs, extra=None, size: int = 8) -> Tensor:
        outs = []
        for s in range(0, len(exs), size):
            outs.append(fn(exs[s : s + size]) if extra is None else fn(exs[s : s + size], extra[s : s + size]))
        return torch.cat(outs).cpu()


def main(argv: list[str] | None = None) -> None:
    from sim.lm import load_lm

    args = parse(GistTrainArgs, argv)
    lm, tok = load_lm(args.lm, device=args.train.device, dtype=torch.float32)
    args = replace(args, model=replace(args.model, d_model=int(lm.config.hidden_size)))
    t0 = time.perf_counter()
    trainer = GistTrainer(args, lm, tok)
    if args.resume:
        trainer.resume(args.resume)
    result = trainer.train()
    print(json.dumps(result, indent=1))
    if not args.export:
        return
    card = {"command": " ".join(["python -m gistnet.train", *(sys.argv[1:] if argv is None else argv)]),
            "seed": args.train.seed, "steps": trainer.step, "lm": args.lm,
            "data": "pydoc_data.topics; train = topics whose sorted index % 10 != 9, held-out = the others",
            "train_args": to_dict(args), "held_out_validation": result,
            "train_seconds": time.perf_counter() - t0}
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
