"""Validation numbers of the starting point (the shipped checkpoint, no steps) on the comparison's
windows.

Usage: python -m benchmarks.gistnet_start_validation <the COMMON flags of
scripts/gistnet_objectives_cpu.sh> --out DIR
"""

import json
import sys
from dataclasses import replace

import torch
from transformers.utils import logging as hf_logging

from gistnet.train import GistTrainArgs, GistTrainer
from megacontext.cli import parse
from megacontext.lm import load_lm

hf_logging.disable_progress_bar()
args = parse(GistTrainArgs, sys.argv[1:])
lm, tok = load_lm(args.lm, device="cpu", dtype=torch.float32)
args = replace(args, model=replace(args.model, d_model=int(lm.config.hidden_size)))
print(json.dumps(GistTrainer(args, lm, tok).validate(), indent=1))
