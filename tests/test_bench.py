"""`python -m study bench` and the reference Trainer loop, on the tiny model.

A benchmark, never a timed test: these check that it runs, alternates, and prints well-formed
JSON, not how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_context

from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.data import encode, load_data
from objectives.model import build_model, load_pretrained
from study.bench.config import BenchConfig, validate_bench
from study.bench.loops import alternating
from study.bench.memory import BlockPeakMemory, rss_mb
from study.bench.reference import train_reference, training_arguments
from study.cli import main
from study.config import ConfigError

KEYS = {"ours_s", "reference_s", "speedup", "ours_val_f1", "reference_val_f1"}
KEYS |= {"mode", "device", "model"}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bench_runs_and_ends_with_one_json_line(
    tiny_model_dir: Path, tiny_data_dir: Path, capsys, mode: str
) -> None:
    argv = ["bench", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir)]
    argv += ["--mode", mode, "--device", "cpu", "--repeats", "2", "--warmup", "0"]
    argv += ["--batch-size", "16"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert KEYS <= summary.keys()
    assert summary["mode"] == mode and summary["device"] == "cpu"
    assert summary["model"] == str(tiny_model_dir) and summary["batch_size"] == 16
    assert summary["ours_s"] > 0 and summary["reference_s"] > 0
    # `speedup` is rounded to two decimals: below 1x that is more than 2 % of it.
    ratio = summary["reference_s"] / summary["ours_s"]
    assert summary["speedup"] == pytest.approx(ratio, rel=0.02, abs=0.006)
    for loop in ("ours", "reference"):
        assert 0.0 <= summary[f"{loop}_val_f1"] <= 1.0
        assert summary[f"{loop}_peak_mem_mb"] > 0
        assert len(summary[f"{loop}_runs_s"]) == 2
    assert "speedup" in out and "repeat 2/2" in err


def test_bench_defaults_the_batch_size_by_mode() -> None:
    assert BenchConfig(mode="full").train_config().batch_size == 32
    assert BenchConfig(mode="lora").train_config().batch_size == 64
    assert BenchConfig(mode="lora", batch_size=8).train_config().batch_size == 8
    lora = BenchConfig(mode="lora").train_config()
    assert (lora.mode, lora.learning_rate, lora.weight_decay) == ("lora", 5e-4, 0.1)


def test_alternating_order_swaps_every_repeat() -> None:
    assert alternating(3) == [
        (1, "ours"),
        (1, "reference"),
        (2, "reference"),
        (2, "ours"),
        (3, "ours"),
        (3, "reference"),
    ]


@pytest.mark.parametrize(
    "change", [{"repeats": 0}, {"epochs": 0}, {"batch_size": 0}, {"warmup": -1}, {"mode": "x"}]
)
def test_bad_settings_are_refused(change) -> None:
    with pytest.raises(ConfigError):
        validate_bench(replace(BenchConfig(), **change))


def test_bad_flag_exits_2_with_one_line(capsys) -> None:
    assert main(["bench", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --repeats") and "\n" not in err


LINUX_RSS = pytest.mark.skipif(
    not Path("/proc/self/statm").is_file(), reason="the resident set now is read from /proc"
)


def _touch_64_mib() -> None:
    block = torch.ones(64 * 2**20 // 4)  # written, so resident; freed (unmapped) on return
    time.sleep(0.05)  # many sampling intervals while it is held
    del block


@LINUX_RSS
def test_peak_memory_on_cpu_sees_a_block_freed_before_it_ends() -> None:
    before = rss_mb()
    with BlockPeakMemory(torch.device("cpu"), interval_s=0.001) as mem:
        _touch_64_mib()
    assert mem.peak_mb - before >= 48


@LINUX_RSS
def test_peak_memory_on_cpu_is_the_blocks_peak_not_the_processes() -> None:
    """Two runs in one process: the second's peak must not be the first one's."""
    with BlockPeakMemory(torch.device("cpu"), interval_s=0.001) as busy:
        _touch_64_mib()
    with BlockPeakMemory(torch.device("cpu"), interval_s=0.001) as quiet:
        time.sleep(0.02)
    assert quiet.peak_mb <= busy.peak_mb - 32


def test_the_command_line_module_imports_without_torch() -> None:
    code = "import sys, study.bench.command; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_reference_arguments_are_the_reference_runs() -> None:
    args = training_arguments(
        replace(FULL_FT_DEFAULTS, epochs=2), torch.device("cpu"), "/tmp/unused"
    )
    assert args.per_device_train_batch_size == 32 and args.num_train_epochs == 2
    assert args.learning_rate == 1e-4 and args.weight_decay == 0.05
    assert args.warmup_steps == 0.06 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "linear"
    assert args.eval_strategy == "no" and args.save_strategy == "no"
    assert not args.bf16 and not args.fp16  # CPUs train in fp32
    assert args.report_to in ([], "none", ["none"])


def test_reference_loop_trains_the_model_and_times_each_epoch(
    tiny_data_dir: Path, tiny_model_dir: Path
) -> None:
    ctx = tiny_context(tiny_data_dir, tiny_model_dir)
    data = load_data(tiny_data_dir)
    _, tokenizer = load_pretrained(str(tiny_model_dir), data.label_names)
    encoded = encode(data, tokenizer, 32)
    cfg = replace(LORA_DEFAULTS, epochs=2, batch_size=16)
    model = build_model(ctx.base_model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_reference(model, cfg, encoded.train, tokenizer, torch.device("cpu"))
    assert len(result.epoch_times_s) == 2 and result.train_time_s > 0
    changed = [not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before]
    assert any(changed) and result.train_loss > 0


def test_bench_workers_reports_trials_per_hour_and_memory_per_trial(
    tiny_model_dir: Path, tiny_data_dir: Path, capsys
) -> None:
    argv = ["bench", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir)]
    argv += ["--device", "cpu", "--workers", "1", "2", "--n-trials", "2", "--epochs", "1"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bench"] == "workers" and summary["n_trials"] == 2
    assert [r["workers"] for r in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["trials"] == 2 and run["trials_per_hour"] > 0
        assert len(run["peak_mem_mb"]) == 2 and all(m > 0 for m in run["peak_mem_mb"])
    assert summary["runs"][0]["vs_first"] == 1.0


def test_bench_workers_refuses_zero_workers(capsys) -> None:
    assert main(["bench", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
