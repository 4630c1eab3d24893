"""What the GPU and Apple paths need, shown on a CPU: memory of finished trials,
setup time, the precision choice, graph memory and its fallbacks, peak memory, several GPUs.

Nothing here needs an accelerator: the device's capabilities are arguments of pure functions,
and CUDA graph capture and out-of-memory errors are played by stand-ins on the tiny model.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from helpers import tiny_context
from optuna.trial import TrialState

import objectives.objective as O
import objectives.train as T
from objectives.batching import full_batches
from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.device import (
    DeviceError,
    StepPeakMemory,
    autocast_dtype,
    bf16_capable,
    device_bf16_supported,
    macos_version,
    maxrss_mb,
    resolve_device,
    worker_device,
)
from objectives.fastbert import bert_parts
from objectives.graphs import (
    MEMORY_HEADROOM,
    capture_train_step,
    estimate_graph_memory,
    graph_memory_bytes,
    graphs_fit,
)
from objectives.model import build_model
from objectives.objective import run_trial
from study.bench.loops import one_gpu_problem
from study.cli import main
from study.config import ConfigError, StudyConfig, validate


@pytest.fixture(scope="module")
def ctx(tiny_data_dir: Path, tiny_model_dir: Path):
    return tiny_context(tiny_data_dir, tiny_model_dir)


def _study(pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    return optuna.create_study(direction="maximize", pruner=pruner or optuna.pruners.NopPruner())


class PruneFirst(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 0


# ----------------------------------------------------------------------------- 1: memory


class Held:
    """Weak references to a model and to each of its parameters: a model object can be gone
    while its parameters (the device memory) live on in an optimizer or a closure."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]

    def alive(self) -> bool:
        return any(r() is not None for r in self.refs)


def test_pruned_and_failed_trials_free_their_model_before_the_next_trial_trains(
    ctx, monkeypatch
) -> None:
    """Trial 0 is pruned, 1 fails on a NaN loss, 2 runs out of memory while evaluating, 3 in
    the middle of a training step (inside the closures that run it); each model, and every one
    of its parameters (what holds device memory), must be gone when the next trial starts
    training. The garbage collector is off, as it may well be between two trials: only the
    trial's own release path may free them."""
    refs: list[Held] = []
    alive_at_start: list[list[int]] = []
    real_build, real_train, real_evaluate = O.build_model, O.train, T.evaluate
    real_forward = T.make_forward

    def build(base, cfg):
        model = real_build(base, cfg)
        if len(refs) == 1:  # trial 1: poisoned trainable weights, the loss becomes NaN
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
        refs.append(Held(model))
        return model

    def train(model, *args, **kwargs):
        alive_at_start.append([i for i, r in enumerate(refs[:-1]) if r.alive()])
        return real_train(model, *args, **kwargs)

    def evaluate(*args, **kwargs):
        if len(refs) == 3:  # trial 2
            raise torch.OutOfMemoryError("CUDA out of memory (injected in evaluation)")
        return real_evaluate(*args, **kwargs)

    def make_forward(model, device, *args, **kwargs):
        forward = real_forward(model, device, *args, **kwargs)
        calls = [0]

        def failing(ids, mask):
            calls[0] += 1
            if len(refs) == 4 and calls[0] == 3:  # trial 3, its third training step
                raise torch.OutOfMemoryError("CUDA out of memory (injected in a step)")
            return forward(ids, mask)

        return failing

    monkeypatch.setattr(O, "build_model", build)
    monkeypatch.setattr(O, "train", train)
    monkeypatch.setattr(T, "evaluate", evaluate)
    monkeypatch.setattr(T, "make_forward", make_forward)
    cfg = replace(LORA_DEFAULTS, epochs=2, batch_size=32, learning_rate=1e-3)
    study = _study(PruneFirst())
    gc.collect()
    gc.disable()
    try:
        study.optimize(
            lambda trial: run_trial(trial, cfg, ctx, prune=True),
            n_trials=5,
            catch=O.TRIAL_FAILURES,
        )
    finally:
        gc.enable()
    states = [t.state for t in study.trials]
    assert states == [TrialState.PRUNED] + [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert "nan" in study.trials[1].user_attrs["fail_reason"]
    assert "in evaluation" in study.trials[2].user_attrs["fail_reason"]
    assert "in a step" in study.trials[3].user_attrs["fail_reason"]
    assert alive_at_start == [[], [], [], [], []]


# ----------------------------------------------------------------------------- 2: time


def _slow_capture(delay_s: float, fail_first_step: bool = False):
    """A stand-in for graph capture on the CPU: the eager LossStep modules, after a pause (the
    time a real capture takes); optionally the first replay runs out of memory."""
    calls = {"n": 0}

    def capture(steps, samples):
        time.sleep(delay_s)

        def step_fn(step):
            def run(*args):
                calls["n"] += 1
                if fail_first_step and calls["n"] == 1:
                    raise torch.OutOfMemoryError("CUDA out of memory (injected first step)")
                return step(*args)

            return run

        return [step_fn(s) for s in steps]

    return capture


def _capture_with(monkeypatch, stand_in) -> None:
    real = T.capture_train_step

    def capture(model, parts, buckets, batch_size, dtype, device):
        return real(model, parts, buckets, batch_size, dtype, device, capture=stand_in)

    monkeypatch.setattr(T, "capture_train_step", capture)


def test_setup_time_counts_graph_capture_and_every_trial_records_it(ctx, monkeypatch) -> None:
    _capture_with(monkeypatch, _slow_capture(0.3))
    cfg = replace(LORA_DEFAULTS, epochs=1, batch_size=32)
    study = _study()
    study.optimize(lambda t: run_trial(t, cfg, ctx, prune=False), n_trials=1)
    attrs = study.trials[0].user_attrs
    assert attrs["setup_time_s"] >= 0.3  # the capture's pause is in it, not in train_time_s
    assert attrs["train_time_s"] > 0
    assert attrs["cuda_graphs"].startswith("on: ")


def test_pruned_trials_record_setup_time_too(ctx) -> None:
    cfg = replace(LORA_DEFAULTS, epochs=2, batch_size=32)
    study = _study(PruneFirst())
    study.optimize(lambda t: run_trial(t, cfg, ctx, prune=True), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["setup_time_s"] > 0
    assert trial.user_attrs["cuda_graphs"] == "off: no CUDA graphs on cpu"


def _frozen(number: int, train_s: float, setup_s: float | None, f1: float, mode: str = "lora"):
    attrs = {"mode": mode, "train_time_s": train_s, "trainable_params": 1000, "val_f1": f1}
    if setup_s is not None:
        attrs["setup_time_s"] = setup_s
    return optuna.trial.FrozenTrial(
        number=number,
        state=TrialState.COMPLETE,
        value=f1,
        datetime_start=None,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_reports_and_the_note_compare_the_time_a_user_waits(ctx) -> None:
    """A trial that trains fast after a long capture is not cheaper than one without capture."""
    from objectives.record import to_records
    from reports.comparison import compare, note_lines
    from reports.tables import pareto_front

    fast_epochs = _frozen(0, train_s=10.0, setup_s=50.0, f1=0.80)  # waits 60 s
    plain = _frozen(1, train_s=30.0, setup_s=1.0, f1=0.80)  # waits 31 s
    old = _frozen(2, train_s=40.0, setup_s=0.0, f1=0.81)  # no setup to speak of: 40 s
    records = to_records([fast_epochs, plain, old], "s")
    assert [r.wait_time_s for r in records] == [60.0, 31.0, 40.0]
    assert [r.train_time_s for r in records] == [10.0, 30.0, 40.0]  # the trials' own attribute
    assert [r.number for r in pareto_front(records, "wait_time_s")] == [1, 2]
    base = _frozen(3, train_s=100.0, setup_s=20.0, f1=0.7, mode="full")
    base_records = to_records([base], "b", baseline=True)
    findings = compare([*records, *base_records], {})
    assert findings.time_ratio == pytest.approx(40.0 / 120.0)
    note = "\n".join(note_lines(compare([records[0], *base_records])))
    assert "training time (setup included) 60.0 s vs 120.0 s: 0.50x" in note


def test_bench_times_our_loop_with_its_setup(ctx, tiny_data_dir, tiny_model_dir, monkeypatch):
    from objectives.data import encode, load_data
    from objectives.model import load_pretrained
    from study.bench.loops import Workload, _run

    _capture_with(monkeypatch, _slow_capture(0.3))
    data = load_data(tiny_data_dir)
    _, tokenizer = load_pretrained(str(tiny_model_dir), data.label_names)
    w = Workload(
        ctx.base_model,
        tokenizer,
        encode(data, tokenizer, 32),
        ctx.data,
        replace(LORA_DEFAULTS, epochs=1, batch_size=32),
        torch.device("cpu"),
    )
    run = _run(w, "ours", 42)
    assert run.setup_s >= 0.3 and run.seconds_per_epoch == pytest.approx(run.setup_s + run.epoch_s)
    assert run.graphs.startswith("on: ")


# ----------------------------------------------------------------------------- 3: precision


@pytest.mark.parametrize(
    "device, capability, macos, expected",
    [
        ("cuda", (7, 0), None, torch.float16),  # V100: fp16 with loss scaling
        ("cuda", (7, 5), None, torch.float16),  # T4
        ("cuda", (8, 0), None, torch.bfloat16),  # A100
        ("cuda", (8, 9), None, torch.bfloat16),  # L4
        ("cuda", (9, 0), None, torch.bfloat16),  # H100/H200
        ("mps", None, (13, 6, 1), torch.float32),  # Apple GPU on macOS 13: no bf16
        ("mps", None, (14, 0), torch.bfloat16),
        ("mps", None, (15, 3), torch.bfloat16),
        ("cpu", None, None, torch.float32),
    ],
)
def test_precision_is_a_function_of_the_devices_capability(
    device, capability, macos, expected
) -> None:
    assert autocast_dtype(device, True, bf16_capable(device, capability, macos)) == expected
    assert autocast_dtype(device, False, bf16_capable(device, capability, macos)) == torch.float32


def test_emulated_bf16_does_not_count_on_pre_ampere_gpus(monkeypatch) -> None:
    """torch.cuda.is_bf16_supported() says yes on a V100 (emulation); the choice reads the
    compute capability instead, and only from 8.0 (Ampere) on is bf16 taken."""
    for capability, expected in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device=None, c=capability: c
        )
        assert device_bf16_supported(torch.device("cuda:0")) is expected, capability


def test_bf16_on_apple_gpus_needs_macos_14(monkeypatch) -> None:
    monkeypatch.setattr(platform, "mac_ver", lambda: ("13.6.1", ("", "", ""), "arm64"))
    assert device_bf16_supported(torch.device("mps")) is False
    monkeypatch.setattr(platform, "mac_ver", lambda: ("14.4", ("", "", ""), "arm64"))
    assert device_bf16_supported(torch.device("mps")) is True


def test_macos_version_parsing() -> None:
    assert macos_version("14.2.1") == (14, 2, 1)
    assert macos_version("13") == (13,)
    assert macos_version("") is None


# ----------------------------------------------------------------------------- 4: graph memory


def test_graph_memory_grows_with_every_bucket() -> None:
    """bert-base full fine-tuning: each bucket's pool holds a full gradient set (~0.44 GB)."""
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):  # shapes only: nothing is allocated
        model = BertForSequenceClassification(BertConfig(num_labels=77))
    one, optimizer = estimate_graph_memory(model, [64], 32, torch.bfloat16)
    eight, _ = estimate_graph_memory(model, [8, 16, 24, 32, 40, 48, 56, 64], 32, torch.bfloat16)
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert optimizer == 3 * grads
    assert eight > 8 * grads > one > grads
    assert graphs_fit(one, optimizer, 80 * 2**30)  # an 80 GB GPU
    assert not graphs_fit(eight, optimizer, 8 * 2**30)  # an 8 GB one


def test_graph_memory_bytes_is_the_sum_over_buckets() -> None:
    args = dict(batch=4, layers=2, hidden=8, heads=2, intermediate=16, width=2)
    a = graph_memory_bytes(100, 50, [8], **args)
    b = graph_memory_bytes(100, 50, [16], **args)
    assert graph_memory_bytes(100, 50, [8, 16], **args) == a + b
    assert graphs_fit(a, 10, int((a + 10) / MEMORY_HEADROOM) + 1)
    assert not graphs_fit(a, 10, a + 10)


def test_capture_falls_back_to_eager_when_the_graphs_do_not_fit(ctx) -> None:
    model = build_model(ctx.base_model, FULL_FT_DEFAULTS)
    parts = bert_parts(model)
    buckets = full_batches(ctx.data.train, 16).buckets
    args = (model, parts, buckets, 16, torch.float32, torch.device("cpu"))
    tight = capture_train_step(*args, capture=_slow_capture(0.0), free_bytes=2**20)
    assert tight.step is None
    assert tight.reason.startswith("off: the graphs need about") and "free" in tight.reason
    roomy = capture_train_step(*args, capture=_slow_capture(0.0), free_bytes=2**40)
    assert roomy.step is not None and roomy.reason == f"on: {len(buckets)} buckets captured"


def test_out_of_memory_during_capture_trains_eagerly(ctx, monkeypatch) -> None:
    def half_then_oom(steps, samples):
        # a real capture patches each module's forward as it goes, then runs out of memory
        steps[0].forward = lambda *a: None
        raise torch.OutOfMemoryError("CUDA out of memory (injected during capture)")

    seen = []
    real = T.capture_train_step

    def capture(model, parts, buckets, batch_size, dtype, device):
        outcome = real(model, parts, buckets, batch_size, dtype, device, capture=half_then_oom)
        seen.append(outcome)
        return outcome

    monkeypatch.setattr(T, "capture_train_step", capture)
    cfg = replace(LORA_DEFAULTS, epochs=1, batch_size=32)
    with pytest.warns(UserWarning, match="out of memory during capture"):
        result = T.train(build_model(ctx.base_model, cfg), cfg, ctx.data)
    assert seen[0].step is None
    assert result.setup.graphs.startswith("off: out of memory during capture")
    assert len(result.history) == 1


def test_out_of_memory_in_the_first_graphed_step_retries_the_trial_eagerly(ctx, monkeypatch):
    _capture_with(monkeypatch, _slow_capture(0.0, fail_first_step=True))
    refs: list[Held] = []
    alive_at_start: list[list[int]] = []
    real_build, real_train = O.build_model, O.train

    def build(base, cfg):
        model = real_build(base, cfg)
        refs.append(Held(model))
        return model

    def train(model, *args, **kwargs):
        alive_at_start.append([i for i, r in enumerate(refs[:-1]) if r.alive()])
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(O, "build_model", build)
    monkeypatch.setattr(O, "train", train)
    cfg = replace(LORA_DEFAULTS, epochs=1, batch_size=32)
    study = _study()
    study.optimize(lambda t: run_trial(t, cfg, ctx, prune=False), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["cuda_graphs"].startswith(
        "off: out of memory in the first step with CUDA graphs"
    )
    assert trial.user_attrs["cuda_graphs"].endswith("retried eagerly")
    assert len(refs) == 2 and alive_at_start == [[], []]  # a fresh model, the first one freed


# ----------------------------------------------------------------------------- 5: peak memory


def test_maxrss_is_bytes_on_macos_and_kib_on_linux() -> None:
    assert maxrss_mb(2 * 2**30, "darwin") == 2048
    assert maxrss_mb(2 * 2**20, "linux") == 2048


def test_cpu_peak_on_a_mac_is_not_1024_times_too_large(monkeypatch) -> None:
    import resource

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**30))
    assert StepPeakMemory(torch.device("cpu")).peak_mb() == 3072


def test_mps_peak_is_the_highest_sample_not_the_memory_at_the_end() -> None:
    readings = iter([100, 700, 300, 200, 150])
    memory = StepPeakMemory(torch.device("mps"), read_mps=lambda: next(readings) * 2**20)
    memory.sample()
    memory.sample()
    memory.sample()
    assert memory.peak_mb() == 700


def test_bench_samples_mps_memory_while_the_block_runs() -> None:
    from study.bench.memory import BlockPeakMemory as BenchPeak

    values = iter([10.0, 50.0, 90.0] + [20.0] * 10_000)
    with BenchPeak(torch.device("mps"), interval_s=0.001, read=lambda: next(values)) as mem:
        time.sleep(0.05)
    assert mem.peak_mb == 90.0


# ----------------------------------------------------------------------------- 6: bench, GPUs


def test_bench_refuses_several_visible_gpus() -> None:
    assert one_gpu_problem(torch.device("cuda:0"), 1) is None
    assert one_gpu_problem(torch.device("cpu"), 4) is None
    problem = one_gpu_problem(torch.device("cuda:1"), 2)
    assert "DataParallel" in problem and "CUDA_VISIBLE_DEVICES=1" in problem


def test_bench_with_two_gpus_exits_2_before_loading_anything(monkeypatch, capsys) -> None:
    import objectives.data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def no_loading(*args, **kwargs):
        raise AssertionError("bench loaded data before refusing the GPUs")

    monkeypatch.setattr(objectives.data, "load_data", no_loading)
    assert main(["bench", "--device", "cuda", "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bench compares one GPU") and "\n" not in err


# ----------------------------------------------------------------------------- several GPUs


def test_workers_are_placed_on_gpu_k_mod_the_number_of_gpus() -> None:
    assert [worker_device("auto", k, 2) for k in range(8)] == ["cuda:0", "cuda:1"] * 4
    assert [worker_device("cuda", k, 3) for k in range(4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
    ]
    assert [worker_device("cuda:1", k, 2) for k in range(3)] == ["cuda:1"] * 3
    assert worker_device("cpu", 3, 2) == "cpu" and worker_device("mps", 1, 0) == "mps"
    assert worker_device("auto", 1, 0) == "auto"  # no GPU: resolved later (mps or cpu)


def test_cuda_devices_carry_their_index() -> None:
    assert resolve_device("cuda", 1, False) == "cuda:0"
    assert resolve_device("cuda:1", 2, False) == "cuda:1"
    assert str(torch.device(resolve_device("auto", 4, True))) == "cuda:0"
    with pytest.raises(DeviceError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2", 2, False)
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu", 1, False)


def test_config_accepts_cuda_n_and_refuses_other_names() -> None:
    assert validate(replace(StudyConfig(), device="cuda:1")).device == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", "cuda1"):
        with pytest.raises(ConfigError, match="--device"):
            validate(replace(StudyConfig(), device=bad))


def test_optimize_on_a_missing_gpu_exits_2_with_one_line(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys
) -> None:
    db = tmp_path / "o.db"
    argv = ["optimize", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir)]
    argv += ["--storage", f"sqlite:///{db}", "--device", "cuda:1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device cuda:1 was asked for, but PyTorch sees no CUDA GPU"
    assert not db.exists()
