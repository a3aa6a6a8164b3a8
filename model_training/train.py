"""``ecglab train``: train the S4 ECG + metadata fusion model as the paper does (method.md §3).

Usage::

    ecglab train --data DATASET --out RUN                         # paper settings, 40 epochs
    ecglab train --data DATASET --out RUN --epochs=3 --model.d_model=64 --batch_size=16
    ecglab train --data DATASET --out RUN --config model_training/configs/small.yaml
    ecglab train --out RUN --resume --epochs=60                   # continue (and extend) a run
    torchrun --nproc_per_node=4 -m cds_service.cli train --data DATASET --out RUN

This module is the command line only. The work is done by :mod:`model_training.train_loop`
(data, model, epochs, validation, files written to RUN), :mod:`model_training.checkpoint`
(checkpoint format; ``--resume`` continues bit-exactly: model, optimiser, epoch, RNG states of
python/numpy/torch per rank and the sampler state), :mod:`model_training.distributed` (devices,
``torchrun`` ranks: NCCL on GPUs, gloo on CPUs) and :mod:`model_training.predict` (window-averaged
validation predictions and metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_training.config import TrainConfig, add_config_arguments, overrides_from_args
from model_training.distributed import init_distributed, shutdown_distributed
from model_training.train_loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ecglab train``; every TrainConfig key is also a ``--key=value`` option."""
    parser.add_argument(
        "--data",
        type=Path,
        help="DATASET directory from 'ecglab preprocess' (default on --resume: the run's)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="RUN directory for checkpoints, logs and plots"
    )
    parser.add_argument(
        "--config", type=Path, help="YAML or JSON file of config keys (applied before --key=value)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint_last.pt")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to train (default: auto)"
    )
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ecglab train``; returns the exit status."""
    overrides = overrides_from_args(args)
    ctx = init_distributed(args.device)
    try:
        train(
            data=args.data,
            out=args.out,
            config_file=args.config,
            overrides=overrides,
            resume=args.resume,
            ctx=ctx,
            command_line=list(sys.argv),
            arguments={
                "data": str(args.data) if args.data else None,
                "out": str(args.out),
                "config": str(args.config) if args.config else None,
                "resume": bool(args.resume),
                "device": args.device,
                "overrides": overrides,
            },
        )
    finally:
        shutdown_distributed(ctx)
    return 0
