"""The loop comparison: this project's training loop against the Trainer reference, alternating.

`run_bench` builds the shared workload once, warms both loops up and alternates the timed runs;
`BenchResult.summary` turns the runs into the JSON figures and `report_lines` into the report.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from objectives.config import TrainConfig
from objectives.device import compute_dtype, cuda_device_count, detect_device, release_memory
from objectives.evaluation import evaluate
from objectives.model import build_model
from objectives.train import train
from study.bench.config import BenchConfig
from study.bench.hardware import hardware
from study.bench.memory import BlockPeakMemory
from study.bench.reference import train_reference
from study.config import ConfigError

LOOPS = ("ours", "reference")


@dataclass(frozen=True)
class Run:
    loop: str
    seconds_per_epoch: float  # what a user waits (setup + epochs) / epochs
    val_f1: float
    peak_mem_mb: float
    setup_s: float = 0.0  # the setup part of the run, once per run
    epoch_s: float = 0.0  # the epochs alone, per epoch
    graphs: str = ""  # ours: whether the step replayed CUDA graphs, and why not


def one_gpu_problem(device: torch.device, visible_gpus: int) -> str | None:
    """Why the loops cannot be compared on `device`, or None.

    With several visible GPUs the Trainer wraps the model in `DataParallel`, splits every batch
    over all of them and starts on cuda:0, while this project's loop trains on one GPU.
    """
    if device.type != "cuda" or visible_gpus <= 1:
        return None
    return (
        f"bench compares one GPU with one GPU, but {visible_gpus} are visible and the Trainer "
        "would split every batch over all of them (DataParallel); make one visible, e.g. "
        f"CUDA_VISIBLE_DEVICES={device.index or 0} python -m study bench ..."
    )


def alternating(repeats: int) -> list[tuple[int, str]]:
    """(repeat, loop) in run order: ours first in odd repeats, the reference first in even, so
    that a drift in the machine's load hits both loops alike."""
    order = []
    for i in range(repeats):
        loops = LOOPS if i % 2 == 0 else LOOPS[::-1]
        order += [(i + 1, loop) for loop in loops]
    return order


@dataclass(frozen=True)
class Workload:
    """What both loops share, built once: the pretrained model, tokens and prepared tensors."""

    base_model: Any
    tokenizer: Any
    encoded: Any  # objectives.data.EncodedData
    data: Any  # objectives.batching.PreparedData
    cfg: TrainConfig
    device: torch.device


def build_workload(cfg: BenchConfig, device: torch.device) -> Workload:
    """The steps of `study.prepare.prepare_run`, keeping what it drops: the Trainer reference
    needs the tokenizer (to pad its batches) and the unpadded token ids, which `prepare_run`'s
    `RunContext` does not hold; getting them from it would mean loading the tokenizer and
    tokenising again, held in memory while the runs' resident set is measured."""
    # Imported here, when called, so that a test can prove nothing loads before the GPU check.
    from objectives.batching import prepare
    from objectives.data import encode, load_data
    from objectives.model import load_pretrained

    data = load_data(cfg.study_config().resolved_data_dir, cfg.max_train_samples)
    base, tokenizer = load_pretrained(cfg.model, data.label_names)
    encoded = encode(data, tokenizer, cfg.max_length)
    return Workload(
        base_model=base,
        tokenizer=tokenizer,
        encoded=encoded,
        data=prepare(encoded, data.num_labels, device),
        cfg=cfg.train_config(),
        device=device,
    )


def _run(w: Workload, loop: str, seed: int) -> Run:
    """Train a fresh model with `loop` and `seed`, time it, score it on the validation split."""
    cfg = replace(w.cfg, seed=seed)
    model = build_model(w.base_model, cfg)
    try:
        graphs = ""
        with BlockPeakMemory(w.device) as mem:
            if loop == "ours":
                result = train(model, cfg, w.data)
                setup, seconds = result.setup.setup_time_s, result.train_time_s
                f1, graphs = result.history[-1].val_f1, result.setup.graphs
            else:
                ref = train_reference(model, cfg, w.encoded.train, w.tokenizer, w.device)
                setup, seconds = ref.setup_time_s, ref.train_time_s
        if loop != "ours":
            dtype = compute_dtype(w.device, w.cfg.mixed_precision)
            f1 = evaluate(model, w.data.val, w.data.num_labels, dtype).f1
        epochs = w.cfg.epochs
        return Run(
            loop, (setup + seconds) / epochs, f1, mem.peak_mb, setup, seconds / epochs, graphs
        )
    finally:
        del model
        release_memory(w.device)


@dataclass
class BenchResult:
    cfg: BenchConfig
    device: str
    hardware: str
    train_samples: int
    runs: list[Run] = field(default_factory=list)

    def of(self, loop: str) -> list[Run]:
        return [r for r in self.runs if r.loop == loop]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for loop in LOOPS:
            out.update(self._loop_figures(loop))
        out["ours_graphs"] = self.of("ours")[-1].graphs
        return {
            "ours_s": out["ours_s"],
            "reference_s": out["reference_s"],
            "speedup": round(out["reference_s"] / out["ours_s"], 2),
            "speedup_epochs_only": round(out["reference_epoch_s"] / out["ours_epoch_s"], 2),
            "time": "seconds per epoch a user waits: setup + epochs, divided by epochs",
            "ours_val_f1": out["ours_val_f1"],
            "reference_val_f1": out["reference_val_f1"],
            "mode": self.cfg.mode,
            "device": self.device,
            "model": self.cfg.model,
            "batch_size": self.cfg.train_config().batch_size,
            "train_samples": self.train_samples,
            "epochs": self.cfg.epochs,
            "repeats": self.cfg.repeats,
            **{k: v for k, v in out.items() if k not in ("ours_s", "reference_s")},
            "hardware": self.hardware,
            "torch_threads": torch.get_num_threads(),
        }

    def _loop_figures(self, loop: str) -> dict[str, Any]:
        """One loop's medians over its repeats, under keys prefixed with its name."""
        runs = self.of(loop)
        s = statistics.median(r.seconds_per_epoch for r in runs)
        f1s = [r.val_f1 for r in runs]
        return {
            f"{loop}_s": round(s, 3),
            f"{loop}_samples_per_s": round(self.train_samples / s, 1),
            f"{loop}_val_f1": round(statistics.median(f1s), 4),
            f"{loop}_val_f1_sd": round(statistics.stdev(f1s), 4) if len(f1s) > 1 else None,
            f"{loop}_peak_mem_mb": round(max(r.peak_mem_mb for r in runs), 1),
            f"{loop}_runs_s": [round(r.seconds_per_epoch, 3) for r in runs],
            f"{loop}_setup_s": round(statistics.median(r.setup_s for r in runs), 3),
            f"{loop}_epoch_s": round(statistics.median(r.epoch_s for r in runs), 3),
        }


def run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> BenchResult:
    """Build the workload once, warm both loops up, then alternate the timed runs."""
    device = detect_device(cfg.device)
    problem = one_gpu_problem(device, cuda_device_count())
    if problem is not None:
        raise ConfigError(problem)
    w = build_workload(cfg, device)
    result = BenchResult(cfg, str(device), hardware(device), len(w.encoded.train))
    log(
        f"bench: {cfg.mode} fine-tuning of {cfg.model} on {device} ({result.hardware}), "
        f"{result.train_samples} training examples, batch {w.cfg.batch_size}, "
        f"{cfg.epochs} epoch(s) per run, {torch.get_num_threads()} torch threads"
    )
    for i in range(cfg.warmup):
        for loop in LOOPS:
            run = _run(w, loop, cfg.seed)
            log(f"  warm-up {i + 1}: {loop:9s} {run.seconds_per_epoch:8.2f} s/epoch (not counted)")
    for repeat, loop in alternating(cfg.repeats):
        run = _run(w, loop, cfg.seed + repeat - 1)  # both loops get the same seeds
        result.runs.append(run)
        log(
            f"  repeat {repeat}/{cfg.repeats}: {loop:9s} {run.seconds_per_epoch:8.2f} s/epoch, "
            f"val F1 {run.val_f1:.4f}, peak {run.peak_mem_mb:.0f} MB"
        )
    return result


def report_lines(result: BenchResult) -> list[str]:
    """The human-readable table, then the JSON line."""
    s = result.summary()
    mem = "device memory" if result.device.startswith("cuda") else "memory (process RSS)"
    lines = [
        f"{'loop':10s} {'s/epoch':>9s} {'setup s':>8s} {'epoch s':>8s} {'samples/s':>10s} "
        f"{'val F1':>8s} {'peak ' + mem}"
    ]
    for loop in LOOPS:
        lines.append(
            f"{loop:10s} {s[f'{loop}_s']:9.2f} {s[f'{loop}_setup_s']:8.2f} "
            f"{s[f'{loop}_epoch_s']:8.2f} {s[f'{loop}_samples_per_s']:10.1f} "
            f"{s[f'{loop}_val_f1']:8.4f} {s[f'{loop}_peak_mem_mb']:.0f} MB"
        )
    lines.append(
        f"speedup (reference / ours, setup included): {s['speedup']:.2f}x "
        f"(epochs alone {s['speedup_epochs_only']:.2f}x), medians of {result.cfg.repeats}; "
        f"ours: CUDA graphs {s['ours_graphs']}"
    )
    lines.append(json.dumps(s))
    return lines
