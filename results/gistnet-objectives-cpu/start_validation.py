"""Validation numbers of the starting point (the shipped checkpoint) on the same windows as the comparison."""
import json, sys, torch
from dataclasses import replace
from gistnet.train import GistTrainer, GistTrainArgs
from lensnet.train import TrainConfig
from sim.cli import parse
from sim.lm import load_lm
from transformers.utils import logging as hl; hl.disable_progress_bar()
argv = sys.argv[1:]
args = parse(GistTrainArgs, argv)
lm, tok = load_lm(args.lm, device="cpu", dtype=torch.float32)
args = replace(args, model=replace(args.model, d_model=int(lm.config.hidden_size)))
tr = GistTrainer(args, lm, tok)
print(json.dumps(tr.validate(), indent=1))
