"""`python -m study bench`: this project's training loop against the Hugging Face `Trainer`.

Both loops train a fresh copy of the same model (`build_model`) on the same tokenised training
split with the same settings and, in each repeat, the same seed (the next repeat takes the next
seed, so the spread of validation F1 over repeats shows each loop's seed noise, against which the
loops' F1 difference is judged). They run in one process, alternating (ours first in odd
repeats, the reference first in even ones, so a drift in machine load hits both alike), after a
warm-up run of each that is not counted. Each run is timed as a user waits for it: its setup
(the copy to the device, CUDA graph capture and the optimizer for ours; building the Trainer up
to its first epoch for the reference) plus its training epochs (the device synced at both ends;
evaluation excluded), and then scored on the validation split by the same evaluation code. The
report gives medians over the repeats; its last line is one JSON object for scripts (`ours_s`,
`reference_s`: seconds per epoch, setup included; `speedup` = reference_s / ours_s; the epochs
alone in `*_epoch_s` and `speedup_epochs_only`; ...).

Both loops train on one GPU: with several visible GPUs the Trainer would split every batch over
all of them (`DataParallel`), so `bench` refuses and says how to pick one.

`bench --workers 1 2 4` measures something else: trials per hour of `optimize --workers N`, the
LoRA trials of a fresh study (random sampler, no pruning, so every trial does the same work)
timed from start-up to the last trial, all workers on one device, and each trial's peak memory
(`peak_mem_mb`), which must not grow from trial to trial.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS, TrainConfig
from objectives.data import DATA_DIR_ENV
from objectives.train import is_device_name
from study.config import DEVICE_HELP, ConfigError, device_arg

MODES = ("full", "lora")
DEFAULT_BATCH = {"full": FULL_FT_DEFAULTS.batch_size, "lora": LORA_DEFAULTS.batch_size}
LOOPS = ("ours", "reference")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "bert-base-uncased"  # Hub id or local folder
    data_dir: str | None = None  # None: $BANKING77_DATA_DIR, else the Hugging Face Hub
    mode: str = "full"
    device: str = "auto"
    max_train_samples: int | None = None
    batch_size: int | None = None  # None: the mode's default (full 32, LoRA 64)
    epochs: int = 1  # per run; more epochs show that both loops learn alike
    repeats: int = 3  # timed runs of each loop; the report gives medians
    warmup: int = 1  # untimed runs of each loop first (allocator, kernels, lazy init)
    seed: int = 42
    max_length: int = 64

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH[self.mode]

    @property
    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or None

    def train_config(self) -> TrainConfig:
        defaults = FULL_FT_DEFAULTS if self.mode == "full" else LORA_DEFAULTS
        return replace(
            defaults, epochs=self.epochs, batch_size=self.resolved_batch_size, seed=self.seed
        )


def validate(cfg: BenchConfig) -> BenchConfig:
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}")
    if not is_device_name(cfg.device):
        raise ConfigError(f"--device must be one of {DEVICE_HELP}")
    for name in ("epochs", "repeats", "max_length", "batch_size", "max_train_samples"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {cfg.warmup}")
    return cfg


# ----------------------------------------------------------------------------- measuring


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


class PeakMemory:
    """Peak memory while a block runs, in MiB.

    CUDA: allocated device memory, from the allocator's own peak counter. Elsewhere a thread
    samples every few milliseconds while the block runs: on MPS the allocated device memory
    (torch has no peak counter there), on CPUs the process's resident set (its high-water mark,
    `ru_maxrss`, never comes down). `read` replaces the sampled quantity (tests).
    """

    def __init__(
        self,
        device: torch.device,
        interval_s: float = 0.005,
        read: Callable[[], float] | None = None,
    ) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._read = read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda" and self._read is None:
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self._read is None:
            self._read = mps_allocated_mb if self.device.type == "mps" else rss_mb
        self.peak_mb = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._read())

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._read())


def mps_allocated_mb() -> float:
    return torch.mps.current_allocated_memory() / 2**20


def rss_mb() -> float:
    """The resident set of this process (Linux /proc; the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        from objectives.train import maxrss_mb

        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)


def alternating(repeats: int) -> list[tuple[int, str]]:
    """(repeat, loop) in run order: ours first in odd repeats, the reference first in even."""
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
    data: Any  # objectives.train.PreparedData
    cfg: TrainConfig
    device: torch.device


def _run(w: Workload, loop: str, seed: int) -> Run:
    """Train a fresh model with `loop` and `seed`, time it, score it on the validation split."""
    from objectives.model import build_model
    from objectives.reference import train_reference
    from objectives.train import (
        autocast_dtype,
        device_bf16_supported,
        evaluate,
        release_memory,
        train,
    )

    cfg = replace(w.cfg, seed=seed)
    model = build_model(w.base_model, cfg)
    try:
        graphs = ""
        with PeakMemory(w.device) as mem:
            if loop == "ours":
                result = train(model, cfg, w.data)
                setup, seconds = result.setup_time_s, result.train_time_s
                f1, graphs = result.history[-1].val_f1, result.setup.graphs
            else:
                ref = train_reference(model, cfg, w.encoded.train, w.tokenizer, w.device)
                setup, seconds = ref.setup_time_s, ref.train_time_s
        if loop != "ours":
            dtype = autocast_dtype(
                w.device.type, w.cfg.mixed_precision, device_bf16_supported(w.device)
            )
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
            runs = self.of(loop)
            s = statistics.median(r.seconds_per_epoch for r in runs)
            out[f"{loop}_s"] = round(s, 3)
            out[f"{loop}_samples_per_s"] = round(self.train_samples / s, 1)
            f1s = [r.val_f1 for r in runs]
            out[f"{loop}_val_f1"] = round(statistics.median(f1s), 4)
            out[f"{loop}_val_f1_sd"] = round(statistics.stdev(f1s), 4) if len(f1s) > 1 else None
            out[f"{loop}_peak_mem_mb"] = round(max(r.peak_mem_mb for r in runs), 1)
            out[f"{loop}_runs_s"] = [round(r.seconds_per_epoch, 3) for r in runs]
            out[f"{loop}_setup_s"] = round(statistics.median(r.setup_s for r in runs), 3)
            out[f"{loop}_epoch_s"] = round(statistics.median(r.epoch_s for r in runs), 3)
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
            "batch_size": self.cfg.resolved_batch_size,
            "train_samples": self.train_samples,
            "epochs": self.cfg.epochs,
            "repeats": self.cfg.repeats,
            **{k: v for k, v in out.items() if k not in ("ours_s", "reference_s")},
            "hardware": self.hardware,
            "torch_threads": torch.get_num_threads(),
        }


def hardware(device: torch.device) -> str:
    """A short description of the machine, for the README's figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    label = f"{cpu}, {os.cpu_count()} logical CPUs"
    return label if device.type == "cpu" else f"{label}, {device.type}"


def run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> BenchResult:
    """Build the workload once, warm both loops up, then alternate the timed runs."""
    from objectives.data import encode, load_data
    from objectives.model import load_pretrained
    from objectives.train import cuda_device_count, detect_device, prepare

    device = detect_device(cfg.device)
    problem = one_gpu_problem(device, cuda_device_count())
    if problem is not None:
        raise ConfigError(problem)
    data = load_data(cfg.resolved_data_dir, cfg.max_train_samples)
    base, tokenizer = load_pretrained(cfg.model, data.label_names)
    encoded = encode(data, tokenizer, cfg.max_length)
    w = Workload(
        base_model=base,
        tokenizer=tokenizer,
        encoded=encoded,
        data=prepare(encoded, data.num_labels, device),
        cfg=cfg.train_config(),
        device=device,
    )
    result = BenchResult(cfg, str(device), hardware(device), len(encoded.train))
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


# ----------------------------------------------------------------------------- workers


def run_workers_bench(
    cfg: BenchConfig, workers: list[int], n_trials: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Trials per hour of `optimize --workers N` for each N, each in a fresh SQLite study."""
    import tempfile
    import time

    from objectives.train import detect_device
    from storage import get_storage
    from study.config import StudyConfig
    from study.config import validate as validate_study
    from study.prepare import prepare_run
    from study.runner import run_workers

    device = detect_device(cfg.device)
    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            study_cfg = validate_study(
                StudyConfig(
                    study_name="bench-workers",
                    storage=f"sqlite:///{tmp}/optuna.db",
                    model=cfg.model,
                    data_dir=cfg.resolved_data_dir,
                    max_train_samples=cfg.max_train_samples,
                    epochs=cfg.epochs,
                    seed=cfg.seed,
                    device=str(device),  # every worker on this one device, none spread
                    max_length=cfg.max_length,
                    n_trials=n_trials,
                    sampler="random",
                    pruner="none",
                    progress=False,
                    workers=n,
                    keep="none",
                )
            )
            t0 = time.perf_counter()
            storage = get_storage(study_cfg.storage, study_cfg.heartbeat)
            study = run_workers(study_cfg, prepare_run(study_cfg), storage)
            wall = time.perf_counter() - t0
            trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        done = [t for t in trials if t.state.name == "COMPLETE"]

        # Trials per hour once every worker runs: first trial start to last trial end.
        span = (
            (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done))
            if done
            else None
        )
        steady = round(len(done) * 3600 / span.total_seconds(), 1) if span else None
        row = {
            "workers": n,
            "trials": len(done),
            "wall_s": round(wall, 1),
            "trials_per_hour": round(len(done) * 3600 / wall, 1),
            "steady_trials_per_hour": steady,
            "mean_train_time_s": _mean_attr(done, "train_time_s"),
            "mean_setup_time_s": _mean_attr(done, "setup_time_s"),
            "peak_mem_mb": [t.user_attrs.get("peak_mem_mb") for t in done],
            "devices": sorted({str(t.user_attrs.get("device")) for t in done}),
            "cuda_graphs": sorted({str(t.user_attrs.get("cuda_graphs")) for t in done}),
        }
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


def _mean_attr(trials: list, key: str) -> float | None:
    values = [t.user_attrs[key] for t in trials if key in t.user_attrs]
    return round(statistics.mean(values), 2) if values else None


def workers_report_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{'workers':>7s} {'trials':>6s} {'wall s':>8s} {'trials/h':>9s} {'vs first':>8s}"]
    for r in summary["runs"]:
        lines.append(
            f"{r['workers']:7d} {r['trials']:6d} {r['wall_s']:8.1f} "
            f"{r['trials_per_hour']:9.1f} {r['vs_first'] or 0:8.2f}"
        )
    lines.append(json.dumps(summary))
    return lines


# ----------------------------------------------------------------------------- command line


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time one epoch of this project's training loop against the Hugging Face Trainer",
    )
    p.add_argument("--model", default=BenchConfig.model, help="Hub id or local model folder")
    p.add_argument(
        "--data-dir",
        help=f"folder with Banking77 train.csv/test.csv (default ${DATA_DIR_ENV}, else the Hub)",
    )
    p.add_argument("--mode", choices=MODES, default="full", help="full fine-tuning or LoRA (full)")
    p.add_argument(
        "--device", type=device_arg, default="auto", help=f"where to train: {DEVICE_HELP} (auto)"
    )
    p.add_argument(
        "--max-train-samples",
        type=int,
        help="a stratified subsample of the training split of this many examples",
    )
    p.add_argument(
        "--batch-size", type=int, help="batch size of both loops (default: full 32, lora 64)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each loop, alternating (3)"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of each loop before the timed ones (1)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs per run (1); more compare the validation F1 the loops reach",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="training seed of the first repeat (42); repeat k uses seed + k - 1 in both loops",
    )
    p.add_argument("--max-length", type=int, default=64, help="truncate texts to this many tokens")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        metavar="N",
        help="instead of the loop comparison: trials per hour of `optimize --workers N` for each N",
    )
    p.add_argument(
        "--n-trials",
        type=int,
        default=8,
        help="LoRA trials per --workers measurement (8), each of --epochs epochs",
    )
    p.set_defaults(run=bench_command)


def log(line: str) -> None:
    """Progress goes to stderr, so stdout ends with the JSON line alone."""
    print(line, file=sys.stderr, flush=True)


def bench_command(args: argparse.Namespace) -> int:
    cfg = validate(
        BenchConfig(
            model=args.model,
            data_dir=args.data_dir,
            mode=args.mode,
            device=args.device,
            max_train_samples=args.max_train_samples,
            batch_size=args.batch_size,
            epochs=args.epochs,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            max_length=args.max_length,
        )
    )
    if args.workers:
        if min(args.workers) < 1 or args.n_trials < 1:
            raise ConfigError("--workers and --n-trials must be at least 1")
        lines = workers_report_lines(run_workers_bench(cfg, args.workers, args.n_trials, log))
    else:
        lines = report_lines(run_bench(cfg, log=log))
    for line in lines:
        print(line, flush=True)
    return 0
