"""The command line: `python -m study <command>`.

Exit codes: 0 on success, 2 on a usage or input error (one line on stderr, no traceback),
75 when the database stayed unreachable past --db-outage-grace (rerun to resume), 130 when
interrupted, anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from objectives.config import DATA_DIR_ENV
from objectives.errors import UserError
from objectives.space import load_space
from storage import (
    DEFAULT_URL,
    EXIT_UNAVAILABLE,
    OUTAGE_GRACE_S,
    STORAGE_ENV,
    get_storage,
    parse_url,
    redact,
    resolve_url,
)
from study import recipe
from study.bench.command import add_bench_command
from study.config import (
    BASELINE_SUFFIX,
    CONFIRM_SUFFIX,
    DEVICE_HELP,
    KEEP_POLICIES,
    PRUNERS,
    SAMPLERS,
    StudyConfig,
    check_confirm_counts,
    device_arg,
    given_values,
    parse_trial_ref,
    read_config_file,
    validate,
)
from study.devicecheck import add_device_check_command
from study.quiet import quiet_libraries

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

STORAGE_HELP = (
    f"Optuna storage URL (default ${STORAGE_ENV}, else {DEFAULT_URL}); "
    "grpc://HOST:PORT for a storage proxy"
)
CONFIG_HELP = "TOML file whose storage and study_name keys are used (flags win)"
ARTIFACT_DIR_HELP = (
    "folder of the artifact store holding kept weights (default: the study's, else weights/ "
    "beside the SQLite or journal file, else artifacts/weights)"
)


def _add_run_flags(
    p: argparse.ArgumentParser,
    epochs_help: str = "epochs per trial, the pruner's budget (6)",
    keeps_weights: bool = True,
) -> None:
    """Flags shared by `optimize`, `baseline` and `confirm` (which keeps no weights);
    None means 'not given' (config file wins)."""
    p.add_argument("--study-name", help="study name; the baseline is <name>-full-ft (banking77)")
    p.add_argument("--storage", help=STORAGE_HELP)
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
    p.add_argument("--epochs", type=int, help=epochs_help)
    p.add_argument("--seed", type=int, help="training seed of every run and the sampler seed (42)")
    p.add_argument(
        "--device",
        type=device_arg,
        help=f"where to train: {DEVICE_HELP} (auto: cuda, mps, then cpu; with --workers, "
        "auto and cuda put worker k on GPU k mod the number of GPUs)",
    )
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
        help="no progress bars: one plain line per epoch (the default when not on a terminal)",
    )
    _add_liveness_flags(p)
    if keeps_weights:
        p.add_argument("--artifact-dir", help=ARTIFACT_DIR_HELP)
    p.add_argument("--config", help="TOML file with defaults for these flags (keys = flag names)")


def _add_liveness_flags(p: argparse.ArgumentParser) -> None:
    """How a worker shows it is alive, and how long it waits out a lost database."""
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        help="seconds between a running trial's heartbeats in RDB storages (10)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        help="seconds without heartbeat before a trial counts as dead, is failed and retried (30)",
    )
    p.add_argument(
        "--db-outage-grace",
        type=float,
        help=f"seconds a worker waits out a lost database connection before it stops "
        f"({OUTAGE_GRACE_S:.0f})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m study",
        description="LoRA fine-tuning study of BERT on Banking77 beside a full-FT baseline.",
        epilog="Quick start: README.md#quick-start",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    for add in (_add_optimize, _add_baseline, _add_confirm, _add_viewers, _add_storage_commands):
        add(sub)
    _add_winner_commands(sub)
    add_bench_command(sub)
    add_device_check_command(sub)
    return parser


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    """`optimize`: the LoRA study."""
    opt = sub.add_parser("optimize", help="run (or resume) the LoRA study; runs the baseline first")
    _add_run_flags(opt)
    opt.add_argument("--n-trials", type=int, help="new trials to run in this call (30)")
    opt.add_argument(
        "--timeout", type=float, help="stop starting new trials after this many seconds"
    )
    opt.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="Optuna sampler: tpe (multivariate TPE), random or gp, seeded by --sampler-seed (tpe)",
    )
    opt.add_argument(
        "--pruner", choices=PRUNERS, help="pruner on per-epoch validation F1 (hyperband)"
    )
    opt.add_argument(
        "--space",
        help="search space: default, extended, or a TOML file (docs/methodology.md#search-space)",
    )
    opt.add_argument(
        "--workers", type=int, help="worker processes sharing the trials on this machine (1)"
    )
    opt.add_argument(
        "--sampler-seed",
        type=int,
        help="sampler seed (default --seed); give each machine sharing a study its own",
    )
    opt.add_argument(
        "--keep",
        choices=KEEP_POLICIES,
        help="which trials keep their best weights: all, best (the current --keep-top by "
        "validation F1; the others are removed) or none; the baseline always keeps its (best)",
    )
    opt.add_argument(
        "--keep-top", type=int, help="how many trials --keep best keeps, by validation F1 (5)"
    )
    opt.add_argument(
        "--baseline-sensitivity",
        action="store_true",
        default=None,
        help="also train the baseline at lr / 3 and lr x 3 (once): is the yardstick tuned?",
    )
    opt.set_defaults(run=_optimize)


def _add_baseline(sub: argparse._SubParsersAction) -> None:
    """`baseline`: the fixed full fine-tuning run (and its neighbours)."""
    base = sub.add_parser("baseline", help="run the fixed full fine-tuning baseline study")
    _add_run_flags(base)
    base.add_argument(
        "--sensitivity",
        dest="baseline_sensitivity",
        action="store_true",
        default=None,
        help="also train the fixed configuration at lr / 3 and lr x 3 (neighbours, marked as "
        "such; the fixed run stays the yardstick) and say whether the yardstick is tuned",
    )
    base.set_defaults(run=_baseline)


def _add_confirm(sub: argparse._SubParsersAction) -> None:
    """`confirm`: seed repeats of the best configurations."""
    con = sub.add_parser(
        "confirm",
        help="re-train the best LoRA trials and the baseline with several seeds (<name>-confirm)",
    )
    _add_run_flags(
        con,
        epochs_help="epochs per run (default: as many as the source trial had)",
        keeps_weights=False,
    )
    con.add_argument(
        "--top", type=int, default=3, help="how many of the best COMPLETE LoRA trials (3)"
    )
    con.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds per configuration (3): --seed + 1 ... --seed + S, the same for every one",
    )
    con.set_defaults(run=_confirm)


def _add_viewers(sub: argparse._SubParsersAction) -> None:
    """`report` and `dashboard`: look at a study."""
    rep = sub.add_parser("report", help="write importance and Pareto reports for a study")
    rep.add_argument("--study-name", help="the LoRA study (banking77)")
    rep.add_argument("--storage", help=STORAGE_HELP)
    rep.add_argument("--config", help=CONFIG_HELP)
    rep.add_argument("--out", help="output folder (default artifacts/reports/<study-name>)")
    rep.set_defaults(run=_report)

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard for the storage (127.0.0.1)")
    dash.add_argument("--storage", help=STORAGE_HELP)
    dash.add_argument("--config", help=CONFIG_HELP)
    dash.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1); another one exposes studies to anyone who "
        "reaches it, optuna-dashboard has no authentication",
    )
    dash.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free port)")
    dash.add_argument("--artifact-dir", help=ARTIFACT_DIR_HELP)
    dash.set_defaults(run=_dashboard)


def _add_storage_commands(sub: argparse._SubParsersAction) -> None:
    """`studies` and `storage-proxy`: the storage itself."""
    ls = sub.add_parser(
        "studies", help="list the studies in a storage: role, trials, best F1, model, data"
    )
    ls.add_argument("--storage", help=STORAGE_HELP)
    ls.add_argument("--config", help=CONFIG_HELP.replace(" and study_name keys are", " key is"))
    ls.set_defaults(run=_studies)

    prx = sub.add_parser(
        "storage-proxy",
        help="serve Optuna's gRPC storage proxy for a database (127.0.0.1:13000), for many workers",
    )
    prx.add_argument(
        "--storage",
        help=f"the database to serve (default ${STORAGE_ENV}, else {DEFAULT_URL})",
    )
    prx.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1); another one lets anyone who reaches it read, "
        "change and delete studies: the proxy has no authentication or encryption",
    )
    prx.add_argument("--port", type=int, default=13000, help="port (13000; 0: any free port)")
    prx.add_argument(
        "--db-outage-grace",
        type=float,
        default=OUTAGE_GRACE_S,
        help=f"seconds each call waits out a lost database connection ({OUTAGE_GRACE_S:.0f})",
    )
    prx.add_argument("--config", help=CONFIG_HELP.replace(" and study_name keys are", " key is"))
    prx.set_defaults(run=_storage_proxy)


def _add_trial_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that reload a trial's kept weights (`evaluate`, `export`)."""
    p.add_argument("--study-name", help="the LoRA study (banking77)")
    p.add_argument(
        "--trial",
        required=True,
        help="a trial number, best (the LoRA study's best) or baseline (the full-FT baseline)",
    )
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--artifact-dir", help=ARTIFACT_DIR_HELP)


def _add_winner_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="reload a trial's weights; write metrics.json, per_class_f1.csv, confusion_matrix.png",
    )
    _add_trial_flags(ev)
    ev.add_argument(
        "--split", choices=("val", "test"), default="test", help="split to measure (test)"
    )
    ev.add_argument(
        "--data-dir",
        help=f"data to measure on (default: the study's, else ${DATA_DIR_ENV}, else the Hub); "
        "another folder with the same intents is measured and labelled as other data",
    )
    ev.add_argument(
        "--device", type=device_arg, default="auto", help=f"where to predict: {DEVICE_HELP} (auto)"
    )
    ev.add_argument(
        "--out",
        help="output folder (default artifacts/evaluations/<study>/trial-<N>-<split>); "
        "an earlier evaluation there is replaced",
    )
    ev.set_defaults(run=_evaluate)

    ex = sub.add_parser("export", help="write a trial's model as a standalone Hugging Face folder")
    _add_trial_flags(ex)
    ex.add_argument("--out", required=True, help="the folder to create (must not exist)")
    ex.add_argument(
        "--merge",
        action="store_true",
        help="merge the LoRA adapter into the base model (a full model, no peft needed)",
    )
    ex.set_defaults(run=_export)

    pr = sub.add_parser("predict", help="classify texts with a folder written by export")
    pr.add_argument("--model", required=True, help="a folder written by `export`")
    pr.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    pr.add_argument("--input", help="a CSV file with a header and a 'text' column")
    pr.add_argument("--top-k", type=int, default=3, help="intents shown per text (3)")
    pr.add_argument(
        "--device", type=device_arg, default="auto", help=f"where to predict: {DEVICE_HELP} (auto)"
    )
    pr.add_argument(
        "--no-mixed-precision",
        dest="mixed_precision",
        action="store_false",
        help="predict in fp32 even where bf16/fp16 autocast is available",
    )
    pr.set_defaults(run=_predict)


def _config(args: argparse.Namespace, fixed: tuple[str, ...] = recipe.FIXED_FLAGS) -> StudyConfig:
    """Flags > config file > the study's recipe (when the study exists) > defaults."""
    file_values = read_config_file(args.config) if args.config else None
    given = given_values(vars(args), file_values)
    validate(replace(StudyConfig(), **given))  # a bad value is named as such, study or not
    args.storage = given["storage"]  # for the error message of a storage that fails later
    name = given.get("study_name", StudyConfig.study_name)
    made_with = recipe.load(args.storage, name) or recipe.load(args.storage, name + BASELINE_SUFFIX)
    return validate(replace(StudyConfig(), **recipe.merge(given, made_with, name, fixed)))


def _settle(args: argparse.Namespace) -> None:
    """--storage (and --study-name) of the commands without a run config: flag > the --config
    file's key > ($STUDY_STORAGE for the storage) > default. The file may be a run's config."""
    file_values = read_config_file(args.config) if args.config else {}
    args.storage = resolve_url(args.storage, file_values.get("storage"))
    parse_url(args.storage)  # a wrong URL is answered before anything heavy is imported
    if "study_name" in vars(args) and args.study_name is None:
        args.study_name = file_values.get("study_name", StudyConfig.study_name)


def _optimize(args: argparse.Namespace) -> int:
    cfg = _config(args)  # validated before the heavy imports: a bad flag answers at once
    load_space(cfg.space)  # the same for a bad --space file
    from study.runner import run_optimize

    study, baseline = run_optimize(cfg)
    print(f"\nstudy {cfg.study_name!r} in {redact(cfg.storage)}: best LoRA trials and the baseline")
    lora = study.get_trials(deepcopy=False)
    _print_comparison(cfg, lora, baseline.get_trials(deepcopy=False), show_lora=True)
    return 0


def _baseline(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from study.runner import run_baseline

    trials = run_baseline(cfg).get_trials(deepcopy=False)
    _print_comparison(cfg, _load_trials(cfg.storage, cfg.study_name), trials, show_lora=False)
    return 0


def _load_trials(url: str, name: str) -> list[FrozenTrial]:
    """The trials of study `name` in `url`, or none when it does not exist."""
    from study.studies import study_or_none

    study = study_or_none(get_storage(url, None, create=False), name)
    return study.get_trials(deepcopy=False) if study is not None else []


def _print_comparison(
    cfg: StudyConfig,
    lora: Sequence[FrozenTrial],
    baseline: Sequence[FrozenTrial],
    show_lora: bool,
) -> None:
    """The end-of-run table (the best LoRA trials with `show_lora`, the baseline runs) and the
    comparison's checks; `confirm`'s seed repeats, where they exist, give the baseline's noise."""
    from reports.comparison import compare
    from reports.sensitivity import baseline_seed_f1s
    from reports.tables import trial_records
    from study.terminal import format_checks, format_table

    records = trial_records(lora, cfg.study_name, baseline, cfg.baseline_name)
    confirm = _load_trials(cfg.storage, cfg.study_name + CONFIRM_SUFFIX)
    space = load_space(cfg.space) if show_lora else None
    comparison = compare(
        records, study_name=cfg.study_name, seed_f1s=baseline_seed_f1s(confirm), space=space
    )
    print(format_table(comparison, [r for r in records if not r.baseline] if show_lora else []))
    print(format_checks(comparison))


def _confirm(args: argparse.Namespace) -> int:
    check_confirm_counts(args.top, args.seeds, args.epochs)
    # --epochs here is the runs' own budget, not the study's: it may differ from the recipe
    cfg = _config(args, fixed=tuple(k for k in recipe.FIXED_FLAGS if k != "epochs"))
    from study.confirm import run_confirm
    from study.terminal import format_confirm_table

    study, _ = run_confirm(cfg, args.top, args.seeds, epochs=args.epochs)
    where = f"{study.study_name!r} in {redact(cfg.storage)}"
    print(f"\nstudy {where}: mean ± 95% interval half-width over seeds")
    print(format_confirm_table(study.get_trials(deepcopy=False)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from study.studies import load_studies, study_or_none

    _settle(args)
    storage = get_storage(args.storage, create=False)
    study, baseline = load_studies(storage, args.study_name)
    from reports.write import write_reports

    confirm = study_or_none(storage, args.study_name + CONFIRM_SUFFIX)
    out = Path(args.out or f"artifacts/reports/{args.study_name}")
    written = write_reports(study, baseline, out, confirm)
    print(f"wrote {len(written)} files to {out}; open {out / 'index.html'}")
    return 0


def _studies(args: argparse.Namespace) -> int:
    from study.studies import list_studies

    _settle(args)
    print(list_studies(get_storage(args.storage, heartbeat=None, create=False)))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from study.dashboard import serve

    _settle(args)
    return serve(args.storage, args.host, args.port, args.artifact_dir)


def _evaluate(args: argparse.Namespace) -> int:
    _settle(args)
    parse_trial_ref(args.trial)
    from study.evaluate import evaluate_trial
    from study.terminal import cell

    folder, doc = evaluate_trial(
        args.storage,
        args.artifact_dir,
        args.study_name,
        args.trial,
        args.split,
        args.data_dir,
        args.device,
        args.out,
    )
    stored = doc["stored"]
    print(
        f"{doc['study']} trial {doc['trial']} on {doc['split']} ({doc['examples']} examples, "
        f"{doc['device']}): macro-F1 {doc['macro_f1']:.4f} "
        f"(stored {cell(stored['macro_f1'], '.4f')}), "
        f"accuracy {doc['accuracy']:.4f} (stored {cell(stored['accuracy'], '.4f')})"
    )
    print(f"wrote {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _settle(args)
    parse_trial_ref(args.trial)
    from study.export import export_trial

    name, trial, restored = export_trial(
        args.storage, args.artifact_dir, args.study_name, args.trial, args.out, args.merge
    )
    kind = "adapter" if restored.info.mode == "lora" and not args.merge else "full model"
    print(f"exported {name} trial {trial.number} ({kind}) to {args.out}")
    return 0


def _storage_proxy(args: argparse.Namespace) -> int:
    from study.proxy import serve_proxy

    _settle(args)
    return serve_proxy(args.storage, args.host, args.port, args.db_outage_grace)


def _predict(args: argparse.Namespace) -> int:
    from study.predict import format_predictions, run_predict

    predictions = run_predict(
        args.model, args.texts, args.input, args.top_k, args.device, args.mixed_precision
    )
    print(format_predictions(predictions))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from storage import describe_failure, unavailable_in

        outage = unavailable_in(e)
        if outage is not None:  # an outage longer than --db-outage-grace: rerun to resume
            print(f"error: {outage}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        message = describe_failure(e, resolve_url(getattr(args, "storage", None)))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
