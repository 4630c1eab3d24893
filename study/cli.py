"""The command line: `python -m study <command>`.

Exit codes: 0 on success, 2 on a usage or input error (one line on stderr, no traceback),
130 when interrupted, anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from objectives.data import DATA_DIR_ENV, DataError
from objectives.model import ModelLoadError
from objectives.space import SpaceError
from objectives.train import DeviceError
from storage import DEFAULT_URL, StorageError, redact
from study.config import DEVICES, PRUNERS, SAMPLERS, ConfigError, make_config, read_config_file

# Errors whose message is for the user; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, ModelLoadError, SpaceError, StorageError, DeviceError)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `optimize` and `baseline`; None means 'not given' (config file wins)."""
    p.add_argument("--study-name", help="study name; the baseline is <name>-full-ft (banking77)")
    p.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULT_URL})")
    p.add_argument("--model", help="Hub id or local model folder (default bert-base-uncased)")
    p.add_argument(
        "--data-dir",
        help=f"folder with Banking77 train.csv/test.csv (default ${DATA_DIR_ENV}, else the Hub)",
    )
    p.add_argument(
        "--max-train-samples",
        type=int,
        help="train on a stratified subsample of this many training examples (quick runs)",
    )
    p.add_argument("--epochs", type=int, help="epochs per trial, the pruner's budget (6)")
    p.add_argument("--seed", type=int, help="training seed of every run and the sampler seed (42)")
    p.add_argument("--device", choices=DEVICES, help="where to train (auto: cuda, mps, then cpu)")
    p.add_argument(
        "--no-mixed-precision",
        dest="mixed_precision",
        action="store_false",
        default=None,
        help="train in fp32 even where bf16/fp16 autocast is available",
    )
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (64)")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars",
    )
    p.add_argument("--config", help="TOML file with defaults for these flags (keys = flag names)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m study",
        description="LoRA fine-tuning study of BERT on Banking77 beside a full-FT baseline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    opt = sub.add_parser("optimize", help="run (or resume) the LoRA study; runs the baseline first")
    _add_run_flags(opt)
    opt.add_argument("--n-trials", type=int, help="new trials to run in this call (30)")
    opt.add_argument(
        "--timeout", type=float, help="stop starting new trials after this many seconds"
    )
    opt.add_argument(
        "--sampler", choices=SAMPLERS, help="Optuna sampler (tpe, seeded, multivariate)"
    )
    opt.add_argument(
        "--pruner", choices=PRUNERS, help="pruner on per-epoch validation F1 (hyperband)"
    )
    opt.add_argument("--space", help="search space: default, extended, or a TOML file (see README)")
    opt.set_defaults(run=_optimize)

    base = sub.add_parser("baseline", help="run the fixed full fine-tuning baseline study")
    _add_run_flags(base)
    base.set_defaults(run=_baseline)

    rep = sub.add_parser("report", help="write importance and Pareto reports for a study")
    rep.add_argument("--study-name", default="banking77", help="the LoRA study (banking77)")
    rep.add_argument("--storage", default=DEFAULT_URL, help=f"Optuna storage URL ({DEFAULT_URL})")
    rep.add_argument("--out", help="output folder (default artifacts/reports/<study-name>)")
    rep.set_defaults(run=_report)
    return parser


def _config(args: argparse.Namespace):
    file_values = read_config_file(args.config) if args.config else None
    return make_config(vars(args), file_values)


def _optimize(args: argparse.Namespace) -> int:
    from study.runner import run_optimize
    from study.table import format_table

    cfg = _config(args)
    study, baseline = run_optimize(cfg)
    print(f"\nstudy {cfg.study_name!r} in {redact(cfg.storage)}: best LoRA trials and the baseline")
    print(format_table(study.get_trials(deepcopy=False), baseline.get_trials(deepcopy=False)))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from study.runner import run_baseline
    from study.table import format_table

    cfg = _config(args)
    baseline = run_baseline(cfg)
    print(format_table([], baseline.get_trials(deepcopy=False)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reports import write_reports
    from storage import get_storage
    from study.runner import load_studies

    study, baseline = load_studies(get_storage(args.storage, create=False), args.study_name)
    out = Path(args.out or f"artifacts/reports/{args.study_name}")
    written = write_reports(study, baseline, out)
    print(f"wrote {len(written)} files to {out}; open {out / 'index.html'}")
    return 0


def quiet_libraries() -> None:
    """Keep the terminal for progress and results: hide library notices users cannot act on."""
    import warnings

    import optuna
    import transformers

    # heartbeat, metric names and stale-trial handling are stable in practice; they are the point
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*"
    )  # peft vs transformers 5
    transformers.logging.set_verbosity_error()  # "classifier newly initialised": by design here
    transformers.logging.disable_progress_bar()  # weight loading takes a second; no bar needed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
