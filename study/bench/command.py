"""The `bench` subcommand: its flags (`add_bench_command`) and what it runs (`bench_command`).

`study.cli` imports this module to build its parser, so it must not import torch: `python -m
study --help` and a bad flag answer at once. The measurements are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from objectives.config import DATA_DIR_ENV
from study.bench.config import MODES, BenchConfig, validate_bench
from study.config import DEVICE_HELP, ConfigError, device_arg


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time one epoch of this project's training loop against the Hugging Face Trainer",
    )
    p.add_argument("--model", default=BenchConfig.model, help="Hub id or local model folder")
    p.add_argument(
        "--data-dir",
        help=f"folder with Banking77 train.csv/test.csv (default ${DATA_DIR_ENV}, else the Hub)",
    )
    p.add_argument("--mode", choices=MODES, default="full", help="full fine-tuning or LoRA (full)")
    p.add_argument(
        "--device", type=device_arg, default="auto", help=f"where to train: {DEVICE_HELP} (auto)"
    )
    p.add_argument(
        "--max-train-samples",
        type=int,
        help="a stratified subsample of the training split of this many examples",
    )
    p.add_argument(
        "--batch-size", type=int, help="batch size of both loops (default: full 32, lora 64)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each loop, alternating (3)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of each loop before the timed ones (1)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs per run (1); more compare the validation F1 the loops reach",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="training seed of the first repeat (42); repeat k uses seed + k - 1 in both loops",
    )
    p.add_argument("--max-length", type=int, default=64, help="truncate texts to this many tokens")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        metavar="N",
        help="instead of the loop comparison: trials per hour of `optimize --workers N` for each N",
    )
    p.add_argument(
        "--n-trials",
        type=int,
        default=8,
        help="LoRA trials per --workers measurement (8), each of --epochs epochs",
    )
    p.set_defaults(run=bench_command)


def log(line: str) -> None:
    """Progress goes to stderr, so stdout ends with the JSON line alone."""
    print(line, file=sys.stderr, flush=True)


def bench_command(args: argparse.Namespace) -> int:
    # every BenchConfig field is a flag of the same name
    cfg = validate_bench(
        BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    )
    if args.workers:
        if min(args.workers) < 1 or args.n_trials < 1:
            raise ConfigError("--workers and --n-trials must be at least 1")
        from study.bench.workers import run_workers_bench, workers_report_lines

        lines = workers_report_lines(run_workers_bench(cfg, args.workers, args.n_trials, log))
    else:
        from study.bench.loops import report_lines, run_bench

        lines = report_lines(run_bench(cfg, log=log))
    for line in lines:
        print(line, flush=True)
    return 0
