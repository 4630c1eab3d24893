"""`python -m study device-check`, and the commands a GPU machine runs, without plotly & co.

The GPU machines have torch, transformers, peft, scikit-learn, numpy and tqdm, but not plotly,
matplotlib, optuna-dashboard or datasets. A `sitecustomize` on PYTHONPATH hides those packages
from every process of a command (spawned workers included), as if they were not installed.
Checked: that the commands run and that device-check's JSON is complete; never how fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study.devicecheck import checks, pinned_gpu_env, run_phase, verdict

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("plotly", "matplotlib", "optuna_dashboard", "datasets", "kaleido")
BLOCKER = f"""
# Written by tests/test_devicecheck.py: these packages are "not installed" in this process.
import importlib.machinery

HIDDEN = {set(HIDDEN)!r}
_find_spec = importlib.machinery.PathFinder.find_spec


def _hidden_find_spec(cls, fullname, path=None, target=None):
    if fullname.partition(".")[0] in HIDDEN:
        return None
    return _find_spec(fullname, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_hidden_find_spec)
"""


@pytest.fixture(scope="module")
def gpu_like_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("gpu_like_site")
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run(argv: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_packages_are_hidden(gpu_like_env) -> None:
    for name in HIDDEN:
        out = run(["-c", f"import {name}"], gpu_like_env)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, name
    assert run(["-c", "import torch, optuna, transformers, peft"], gpu_like_env).returncode == 0


def test_optimize_baseline_and_bench_run_without_them(
    gpu_like_env, tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    common = ["--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--device", "cpu"]
    opt = run(
        ["-m", "study", "optimize", *common, "--storage", url, "--no-progress"]
        + ["--epochs", "1", "--n-trials", "3", "--workers", "2"],
        gpu_like_env,
    )
    assert opt.returncode == 0, opt.stderr
    warnings = [ln for ln in opt.stderr.splitlines() if "optuna-dashboard is not installed" in ln]
    assert len(warnings) == 1, opt.stderr  # said once, not by every worker after every trial
    study = optuna.load_study(study_name="banking77", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(t.user_attrs["device"] == "cpu" for t in study.trials)
    base = run(
        ["-m", "study", "baseline", *common, "--storage", url, "--no-progress", "--epochs", "1"],
        gpu_like_env,
    )
    assert base.returncode == 0, base.stderr
    bench = run(
        ["-m", "study", "bench", *common, "--repeats", "1", "--warmup", "0", "--batch-size", "16"],
        gpu_like_env,
    )
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout.strip().splitlines()[-1])["ours_s"] > 0


def test_device_check_runs_its_tiny_version_on_a_cpu_and_prints_every_figure(
    gpu_like_env, banking77_dir: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    argv = ["-m", "study", "device-check", "--out", str(out_dir), "--data-dir", str(banking77_dir)]
    argv += ["--minilm", str(minilm_dir)]
    done = run(argv, gpu_like_env, timeout=1200)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert json.loads((out_dir / "device-check.json").read_text()) == doc
    assert doc["device_check"] == "ok" and doc["version"] == 1
    assert {"environment", "study", "bench", "workers", "targets", "checks", "phase_s"} <= set(doc)

    env = doc["environment"]
    assert env["device"] == "cpu" and env["tiny"] is True and env["precision"] == "float32"
    for key in ("hardware", "visible_gpus", "torch", "transformers", "peft", "optuna", "plan"):
        assert key in env

    study = doc["study"]
    assert sum(study["states"].values()) == study_trials(doc) and "FAIL" not in study["states"]
    assert [t["state"] for t in study["baseline"]] == ["COMPLETE"]
    for t in study["trials"] + study["baseline"]:
        for key in ("val_f1", "setup_time_s", "train_time_s", "peak_mem_mb", "device"):
            assert t[key] is not None, (key, t)
        assert t["cuda_graphs"] == "off: no CUDA graphs on cpu"
    memory = study["memory"]
    assert len(memory["after_each_trial"]) == 1 + len(study["trials"])  # baseline + trials
    assert {"start", "max_growth_mb", "margin_mb", "flat", "kind"} <= set(memory)
    assert memory["flat"] is None  # a CPU's resident set is not judged
    assert study["graphs"] == {
        "taken": False,
        "on": 0,
        "off": 1 + len(study["trials"]),
        "fallback_reasons": ["off: no CUDA graphs on cpu"],
    }
    report = study["report"]
    assert set(report["files"]) == {"summary.csv", "pareto_params.csv", "pareto_time.csv"}
    assert report["figures"].startswith("not drawn here")
    assert "python -m study report" in report["figures"]
    for name in report["files"]:
        assert (out_dir / "report" / name).stat().st_size > 0
    assert (out_dir / "device-check.db").exists()

    for mode, batch in (("full", 32), ("lora", 64)):
        bench = doc["bench"][mode]
        assert bench["mode"] == mode and bench["batch_size"] == batch
        for key in ("ours_s", "reference_s", "speedup", "speedup_epochs_only"):
            assert bench[key] > 0, key
        assert bench["ours_setup_s"] >= 0  # a timing in milliseconds here: may round to 0
        for key in ("ours_epoch_s", "reference_setup_s", "ours_peak_mem_mb", "ours_graphs"):
            assert key in bench

    workers = doc["workers"]
    assert [r["workers"] for r in workers["runs"]] == [1, 2, 4]
    for r in workers["runs"]:
        assert r["trials"] == workers["n_trials"]
        for key in ("trials_per_hour", "steady_trials_per_hour"):
            assert r[key] is not None and r[key] > 0, key
        # a tiny model's setup on a CPU takes milliseconds: 0.0 at two decimals
        assert r["mean_setup_time_s"] is not None and r["mean_setup_time_s"] >= 0
        assert r["devices"] == ["cpu"] and len(r["peak_mem_mb"]) == r["trials"]

    targets = doc["targets"]
    assert targets["judged"] is False
    for name in ("bench_speedup_full", "bench_speedup_lora", "workers_4_vs_1"):
        assert targets[name]["value"] is not None and targets[name]["target"] > 0
        assert targets[name]["met"] is None  # CPU figures are shown, not judged
    assert {"memory_flat", "judged"} <= set(targets)
    assert set(doc["phase_s"]) == {"environment", "study", "bench", "workers"}
    assert doc["checks"] == {
        "phase_errors": {},
        "memory_flat": None,
        "no_failed_trials": True,
        "baseline_complete": True,
        "graphs_taken": False,
    }


def study_trials(doc: dict) -> int:
    return doc["environment"]["plan"]["study_trials"]


def test_device_check_without_data_exits_2_with_one_line(gpu_like_env, tmp_path) -> None:
    env = {k: v for k, v in gpu_like_env.items() if k != "BANKING77_DATA_DIR"}
    done = run(["-m", "study", "device-check", "--out", str(tmp_path / "o")], env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: pass --data-dir DIR")
    assert len(done.stderr.strip().splitlines()) == 1


def test_several_gpus_check_one_at_a_time() -> None:
    assert pinned_gpu_env(1, 2, {})["CUDA_VISIBLE_DEVICES"] == "1"
    assert pinned_gpu_env(1, 2, {"CUDA_VISIBLE_DEVICES": "4, 6"})["CUDA_VISIBLE_DEVICES"] == "6"
    assert pinned_gpu_env(0, 1, {"X": "y"}) == {"X": "y", "CUDA_VISIBLE_DEVICES": "0"}


def test_a_failing_phase_is_recorded_and_the_check_goes_on() -> None:
    doc: dict = {}
    lines: list[str] = []
    run_phase(doc, "bench", lambda: 1 / 0, lines.append)
    run_phase(doc, "workers", lambda: {"runs": []}, lines.append)
    assert doc["bench"] == {"error": "ZeroDivisionError: division by zero"}
    assert doc["workers"] == {"runs": []} and set(doc["phase_s"]) == {"bench", "workers"}
    assert "Traceback" in lines[0]
    found = checks(doc)
    assert found["phase_errors"] == {"bench": "ZeroDivisionError: division by zero"}
    assert verdict(found) == "problems: bench failed"


def test_targets_are_judged_on_cuda_only() -> None:
    from study.devicecheck import targets

    doc = {
        "environment": {"device": "cuda:0"},
        "bench": {"full": {"speedup": 5.5}, "lora": {"speedup": 7.0}},
        "workers": {
            "runs": [
                {"workers": 1, "trials_per_hour": 100.0, "steady_trials_per_hour": 120.0},
                {"workers": 4, "trials_per_hour": 310.0, "steady_trials_per_hour": 420.0},
            ]
        },
        "study": {"memory": {"max_growth_mb": 0.5, "flat": True}},
    }
    found = targets(doc)
    assert found["judged"] is True
    assert [found[k]["met"] for k in ("bench_speedup_full", "bench_speedup_lora")] == [True, False]
    assert found["workers_4_vs_1"] == {
        "value": 3.1,
        "target": 3.0,
        "met": True,
        "steady_value": 3.5,
    }
    assert found["memory_flat"]["met"] is True
    cpu = targets({**doc, "environment": {"device": "cpu"}})
    assert cpu["judged"] is False and cpu["bench_speedup_full"]["met"] is None
