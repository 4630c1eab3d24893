"""`bench --workers N ...`: trials per hour of `optimize --workers N`, each N in a fresh study.

The study is a `StudyConfig` built from the bench's settings and run by the study's own
preparation (`study.prepare.prepare_run`) and worker pool (`study.runner.run_workers`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from objectives.device import detect_device
from objectives.record import to_records
from storage import get_storage
from study.bench.config import BenchConfig
from study.bench.hardware import hardware
from study.config import validate as validate_study
from study.prepare import prepare_run
from study.runner import run_workers


def workers_study(cfg: BenchConfig, device: str, workers: int, n_trials: int, storage: str):
    """The fresh study one measurement runs: every trial does the same work (random sampler,
    no pruning, no weights kept), every worker on `device`, none spread over other GPUs."""
    return validate_study(
        replace(
            cfg.study_config(),
            study_name="bench-workers",
            storage=storage,
            device=device,
            n_trials=n_trials,
            sampler="random",
            pruner="none",
            progress=False,
            workers=workers,
            keep="none",
        )
    )


def run_workers_bench(
    cfg: BenchConfig, workers: list[int], n_trials: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Trials per hour of `optimize --workers N` for each N, each in a fresh SQLite study."""
    device = detect_device(cfg.device)
    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            study_cfg = workers_study(cfg, str(device), n, n_trials, f"sqlite:///{tmp}/optuna.db")
            t0 = time.perf_counter()
            storage = get_storage(study_cfg.storage, study_cfg.heartbeat)
            study = run_workers(study_cfg, prepare_run(study_cfg), storage)
            wall = time.perf_counter() - t0
            trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        row = workers_row(n, [t for t in trials if t.state.name == "COMPLETE"], wall)
        log(
            f"  --workers {n}: {row['trials']} trials in {row['wall_s']} s, "
            f"{row['trials_per_hour']} trials/hour, peak memory per trial {row['peak_mem_mb']} MB"
        )
        rows.append(row)
    base = rows[0]["trials_per_hour"] if rows and rows[0]["trials_per_hour"] else None
    for row in rows:
        row["vs_first"] = round(row["trials_per_hour"] / base, 2) if base else None
    return {
        "bench": "workers",
        "model": cfg.model,
        "mode": "lora",
        "device": str(device),
        "hardware": hardware(device),
        "epochs": cfg.epochs,
        "n_trials": n_trials,
        "max_train_samples": cfg.max_train_samples,
        "runs": rows,
    }


def workers_row(n: int, done: list, wall: float) -> dict[str, Any]:
    """One measurement's figures from its completed trials and its wall-clock seconds."""
    records = to_records(done, "")
    # Trials per hour once every worker runs: first trial start to last trial end.
    span = (
        (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done))
        if done
        else None
    )
    steady = round(len(done) * 3600 / span.total_seconds(), 1) if span else None
    return {
        "workers": n,
        "trials": len(done),
        "wall_s": round(wall, 1),
        "trials_per_hour": round(len(done) * 3600 / wall, 1),
        "steady_trials_per_hour": steady,
        "mean_train_time_s": _mean([r.train_time_s for r in records]),
        "mean_setup_time_s": _mean([r.setup_time_s for r in records]),
        "peak_mem_mb": [r.peak_mem_mb for r in records],
        "devices": sorted({str(r.device) for r in records}),
        "cuda_graphs": sorted({str(r.cuda_graphs) for r in records}),
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 2) if known else None


def workers_report_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{'workers':>7s} {'trials':>6s} {'wall s':>8s} {'trials/h':>9s} {'vs first':>8s}"]
    for r in summary["runs"]:
        lines.append(
            f"{r['workers']:7d} {r['trials']:6d} {r['wall_s']:8.1f} "
            f"{r['trials_per_hour']:9.1f} {r['vs_first'] or 0:8.2f}"
        )
    lines.append(json.dumps(summary))
    return lines
