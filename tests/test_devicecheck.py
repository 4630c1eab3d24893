"""`python -m study device-check`, and the commands a GPU machine runs, without plotly & co.

A GPU machine may have torch, transformers, peft, scikit-learn, numpy and tqdm, but not plotly,
matplotlib, optuna-dashboard or datasets. A `sitecustomize` on PYTHONPATH hides those packages
from every process of a command (spawned workers included), as if they were not installed.
Checked: that the commands run and that device-check's figures agree with what it ran (never
how fast, on a CPU); and its verdict, on stand-in figures of a GPU machine.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from study.devicecheck import (
    MEMORY_MARGIN_MB,
    TINY,
    MemoryProbe,
    checks,
    overall_verdict,
    pinned_gpu_env,
    run_phase,
    targets,
)

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
    import optuna as installed_optuna
    import peft
    import transformers

    out_dir = tmp_path / "out"
    argv = ["-m", "study", "device-check", "--out", str(out_dir), "--data-dir", str(banking77_dir)]
    argv += ["--minilm", str(minilm_dir)]
    done = run(argv, gpu_like_env, timeout=1200)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert json.loads((out_dir / "device-check.json").read_text()) == doc
    assert doc["version"] == 1
    assert doc["device_check"] == (
        "ok: every phase ran; judged no_failed_trials, baseline_complete; "
        "not judged on cpu: memory_flat, graphs_used, targets_met"
    )
    assert set(doc["phase_s"]) == {"environment", "study", "bench", "workers"}
    assert all(s >= 0 for s in doc["phase_s"].values())
    assert doc["wall_s"] >= sum(doc["phase_s"].values()) - 0.5

    env = doc["environment"]
    assert env["device"] == "cpu" and env["tiny"] is True and env["precision"] == "float32"
    assert env["plan"] == json.loads(json.dumps(asdict(TINY))) and env["visible_gpus"] == 0
    assert (env["torch"], env["transformers"], env["peft"], env["optuna"]) == (
        torch.__version__,
        transformers.__version__,
        peft.__version__,
        installed_optuna.__version__,
    )
    assert env["cpus"] == os.cpu_count() and env["hardware"].endswith("logical CPUs")

    study = doc["study"]
    # the tiny plan: a stratified subsample of 4 training examples per intent
    assert study["epochs"] == 2 and study["train_examples"] == 308
    assert [t["number"] for t in study["trials"]] == list(range(TINY.study_trials))
    assert study["states"] == {
        state: sum(t["state"] == state for t in study["trials"])
        for state in {t["state"] for t in study["trials"]}
    }
    assert "FAIL" not in study["states"]
    assert [t["state"] for t in study["baseline"]] == ["COMPLETE"]
    assert set(study["baseline"][0]["params"]) == {
        "learning_rate",
        "lr_scheduler",
        "batch_size",
        "weight_decay",
    }
    for t in study["trials"] + study["baseline"]:
        assert 0.0 <= t["val_f1"] <= 1.0 and 1 <= t["epochs_run"] <= 2, t
        assert t["train_time_s"] > 0 and t["setup_time_s"] >= 0 and t["fail_reason"] is None, t
        assert t["device"] == "cpu" and t["cuda_graphs"] == "off: no CUDA graphs on cpu"
        if t["state"] == "COMPLETE":  # measured on the test split, at the end: COMPLETE only
            assert 0.0 <= t["test_f1"] <= 1.0 and t["peak_mem_mb"] > 0, t
        else:
            assert t["state"] == "PRUNED" and t["test_f1"] is t["peak_mem_mb"] is None, t
    for t in study["trials"]:
        assert set(t["params"]) == {"lora_r", "learning_rate", "lr_scheduler"}
    memory = study["memory"]
    after = memory["after_each_trial"]
    assert [a["trial"] for a in after] == ["baseline", *(str(t["number"]) for t in study["trials"])]
    assert [a["state"] for a in after] == ["COMPLETE", *(t["state"] for t in study["trials"])]
    growth = max(a["allocated_mb"] - memory["start"]["allocated_mb"] for a in after)
    assert memory["max_growth_mb"] == pytest.approx(growth, abs=0.11)
    assert memory["margin_mb"] == MEMORY_MARGIN_MB and memory["flat"] is None
    assert memory["kind"].startswith("process resident set")  # a CPU's: not judged
    assert study["graphs"] == {
        "taken": False,
        "on": 0,
        "off": 1 + len(study["trials"]),
        "fallback_reasons": ["off: no CUDA graphs on cpu"],
    }

    report = study["report"]
    assert set(report["files"]) == {"summary.csv", "pareto_params.csv", "pareto_time.csv"}
    assert report["figures"].startswith("not drawn here")
    assert f"python -m study report --storage {study['storage']}" in report["figures"]
    assert (out_dir / "device-check.db").exists()
    summary = read_rows(out_dir / "report" / "summary.csv")
    assert len(summary) == 1 + len(study["trials"])
    complete = [r for r in summary if r["state"] == "COMPLETE"]
    best = max((r for r in complete if r["mode"] == "lora"), key=lambda r: float(r["val_f1"]))
    [base] = [r for r in summary if r["mode"] == "full"]
    assert report["best_lora_val_f1"] == round(float(best["val_f1"]), 4)
    assert report["baseline_val_f1"] == round(float(base["val_f1"]), 4)
    ratio = float(best["wait_time_s"]) / float(base["wait_time_s"])
    assert report["time_ratio_setup_included"] == pytest.approx(round(ratio, 3), abs=1e-3)
    front = read_rows(out_dir / "report" / "pareto_time.csv")
    assert report["pareto_time"] == [f"{r['study']}#{r['trial']}" for r in front] != []

    for mode, batch in (("full", 32), ("lora", 64)):
        bench = doc["bench"][mode]
        assert bench["mode"] == mode and bench["batch_size"] == batch and bench["device"] == "cpu"
        assert bench["train_samples"] == study["train_examples"] and bench["repeats"] == 1
        for key in ("ours_s", "reference_s", "speedup", "speedup_epochs_only"):
            assert bench[key] > 0, key
        assert bench["speedup"] == pytest.approx(bench["reference_s"] / bench["ours_s"], abs=0.01)
        assert bench["ours_setup_s"] >= 0  # a timing in milliseconds here: may round to 0
        assert bench["ours_graphs"] == "off: no CUDA graphs on cpu"
        assert 0.0 <= bench["ours_val_f1"] <= 1.0 and 0.0 <= bench["reference_val_f1"] <= 1.0

    workers = doc["workers"]
    assert [r["workers"] for r in workers["runs"]] == [1, 2, 4]
    assert workers["n_trials"] == TINY.workers_trials and workers["runs"][0]["vs_first"] == 1.0
    for r in workers["runs"]:
        assert r["trials"] == workers["n_trials"] and r["devices"] == ["cpu"]
        assert r["trials_per_hour"] == pytest.approx(r["trials"] * 3600 / r["wall_s"], rel=0.05)
        assert r["steady_trials_per_hour"] is not None and r["steady_trials_per_hour"] > 0
        # a tiny model's setup on a CPU takes milliseconds: 0.0 at two decimals
        assert r["mean_setup_time_s"] is not None and r["mean_setup_time_s"] >= 0
        assert len(r["peak_mem_mb"]) == r["trials"] and all(m > 0 for m in r["peak_mem_mb"])

    found = doc["targets"]
    tph = {r["workers"]: r["trials_per_hour"] for r in workers["runs"]}
    assert found["judged"] is False
    assert found["bench_speedup_full"]["value"] == doc["bench"]["full"]["speedup"]
    assert found["bench_speedup_lora"]["value"] == doc["bench"]["lora"]["speedup"]
    assert found["workers_4_vs_1"]["value"] == round(tph[4] / tph[1], 2)
    for name in ("bench_speedup_full", "bench_speedup_lora", "workers_4_vs_1"):
        assert found[name]["met"] is None  # CPU figures are shown, not judged
    assert found["memory_flat"] == {
        "value": memory["max_growth_mb"],
        "target": "<= 16.0 MB",
        "met": None,
    }
    assert doc["checks"] == {
        "phase_errors": {},
        "memory_flat": None,
        "no_failed_trials": True,
        "baseline_complete": True,
        "graphs_used": None,
        "targets_met": None,
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


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
    assert overall_verdict(found, "cpu") == "problems: bench failed"


def test_targets_are_judged_on_cuda_only() -> None:
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


# ----------------------------------------------------------------------------- the verdict


def stand_in(device: str = "cuda:0", full=5.5, lora=8.5, per_hour=(100.0, 310.0), on=4) -> dict:
    """The figures of a device-check run as a GPU machine would give them: bench speed-ups,
    trials per hour with 1 and 4 workers, `on` of 4 trials replaying CUDA graphs."""
    return {
        "environment": {"device": device},
        "study": {
            "states": {"COMPLETE": 3},
            "baseline": [{"state": "COMPLETE"}],
            "memory": {"max_growth_mb": 0.5, "flat": None if device == "cpu" else True},
            "graphs": {"on": on, "off": 4 - on},
        },
        "bench": {"full": {"speedup": full}, "lora": {"speedup": lora}},
        "workers": {
            "runs": [
                {"workers": 1, "trials_per_hour": per_hour[0]},
                {"workers": 4, "trials_per_hour": per_hour[1]},
            ]
        },
    }


def judge(doc: dict) -> tuple[dict, str]:
    doc["targets"] = targets(doc)
    found = checks(doc)
    return found, overall_verdict(found, doc["environment"]["device"].split(":")[0])


def test_on_cuda_the_verdict_fails_when_a_speed_target_is_missed() -> None:
    found, verdict = judge(stand_in())
    assert verdict == "ok" and found["targets_met"] is True and found["graphs_used"] is True
    for change, name in (
        ({"full": 4.99}, "bench_speedup_full"),
        ({"lora": 7.9}, "bench_speedup_lora"),
        ({"per_hour": (100.0, 290.0)}, "workers_4_vs_1"),
    ):
        doc = stand_in(**change)
        found, verdict = judge(doc)
        assert doc["targets"][name]["met"] is False, name
        assert found["targets_met"] is False and verdict == "problems: targets_met", name
    # a figure that is missing because its phase failed is no target met
    doc = stand_in()
    doc["bench"] = {"error": "RuntimeError: CUDA error"}
    assert judge(doc)[1] == "problems: bench failed, targets_met"


def test_on_cuda_the_verdict_fails_when_every_trial_ran_eagerly() -> None:
    found, verdict = judge(stand_in(on=0))
    assert found["graphs_used"] is False and verdict == "problems: graphs_used"
    # some trials eager (full fine-tuning whose graphs did not fit, say): the rest replayed them
    assert judge(stand_in(on=1))[1] == "ok"


def test_off_cuda_ok_names_what_was_not_judged() -> None:
    found, verdict = judge(stand_in("cpu", full=0.4, lora=0.3, per_hour=(100.0, 90.0), on=0))
    assert (found["targets_met"], found["graphs_used"], found["memory_flat"]) == (None,) * 3
    assert verdict == (
        "ok: every phase ran; judged no_failed_trials, baseline_complete; "
        "not judged on cpu: memory_flat, graphs_used, targets_met"
    )
    doc = stand_in("cpu")
    doc["study"]["states"]["FAIL"] = 1
    assert judge(doc)[1] == "problems: no_failed_trials"


@pytest.mark.parametrize(
    "growth, flat",
    [(MEMORY_MARGIN_MB - 0.1, True), (MEMORY_MARGIN_MB, True), (MEMORY_MARGIN_MB + 0.1, False)],
)
def test_memory_is_flat_up_to_its_margin_and_not_beyond(growth: float, flat: bool) -> None:
    readings = iter(
        [
            {"allocated_mb": 1000.0, "reserved_mb": 2000.0},  # before the first trial
            {"allocated_mb": 1000.0 + growth / 2, "reserved_mb": 2000.0},
            {"allocated_mb": 1000.0 + growth, "reserved_mb": 2048.0},
        ]
    )
    # a device by name only: the stand-in reading is all the probe asks of it
    probe = MemoryProbe(torch.device("cuda"), read=lambda device: next(readings))
    probe.record("baseline", "COMPLETE")
    probe.record("0", "COMPLETE")
    summary = probe.summary()
    assert summary["flat"] is flat and summary["max_growth_mb"] == round(growth, 1)
    assert summary["max_reserved_growth_mb"] == 48.0
    found, verdict = judge({**stand_in(), "study": {**stand_in()["study"], "memory": summary}})
    assert found["memory_flat"] is flat and (verdict == "ok") is flat
