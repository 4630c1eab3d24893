"""The run configuration of the `optimize` and `baseline` commands.

Precedence: command-line flags > a `--config FILE.toml` (keys are the field names below) >
the defaults here; the storage URL alone may also come from STUDY_STORAGE, after the config
file (`storage.resolve_url`).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from objectives.config import TrainConfig, resolve_data_dir, run_config
from objectives.device import is_device_name
from objectives.errors import UserError
from storage import (
    DEFAULT_URL,
    GRACE_PERIOD_S,
    HEARTBEAT_INTERVAL_S,
    OUTAGE_GRACE_S,
    Heartbeat,
    parse_url,
    resolve_url,
)

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("hyperband", "median", "none")
DEVICE_HELP = "auto, cpu, cuda, cuda:N (GPU N) or mps"
KEEP_POLICIES = ("all", "best", "none")  # which LoRA trials keep their weights
BASELINE_SUFFIX = "-full-ft"
CONFIRM_SUFFIX = "-confirm"


class ConfigError(UserError):
    """A bad flag or config-file value: the message is meant for the user."""


@dataclass(frozen=True)
class StudyConfig:
    study_name: str = "banking77"
    storage: str = DEFAULT_URL
    model: str = "bert-base-uncased"  # Hub id or a local model folder
    data_dir: str | None = None  # None: $BANKING77_DATA_DIR, else the Hugging Face Hub
    max_train_samples: int | None = None  # stratified subsample of the training split
    epochs: int = 6
    seed: int = 42  # training seed of every trial and the sampler's seed
    device: str = "auto"
    mixed_precision: bool = True
    max_length: int = 64  # tokens; Banking77 queries are ~16 WordPiece tokens on average
    n_trials: int = 30  # new trials this run adds (a rerun continues the study)
    timeout: float | None = None  # seconds; stop starting new trials after this
    sampler: str = "tpe"
    pruner: str = "hyperband"
    space: str = "default"  # `default`, `extended` or a TOML file
    progress: bool | None = None  # None: bars on a terminal, one plain line per epoch otherwise
    workers: int = 1  # parallel worker processes on this machine, sharing the storage
    # None: --seed. Worker k of --workers uses sampler_seed + k; separate processes (other
    # machines) need their own, or their random start-up trials would repeat each other's.
    sampler_seed: int | None = None
    # A killed worker's trial is failed and retried once its heartbeat is older than the grace
    # period; 10 s / 30 s lets a resume started a minute after a kill recover it at once.
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S
    grace_period: int = GRACE_PERIOD_S
    # seconds a worker waits out a lost PostgreSQL/MySQL connection before it stops (storage)
    db_outage_grace: float = OUTAGE_GRACE_S
    keep: str = "best"  # LoRA trials keeping weights: all, best (top keep_top by val F1), none
    keep_top: int = 5  # K of keep = "best"; the baseline always keeps its weights
    artifact_dir: str | None = (
        None  # None: weights/ beside the SQLite/journal file (storage.artifacts)
    )
    # Also train the baseline at lr / 3 and lr x 3: is the fixed yardstick near its own optimum?
    baseline_sensitivity: bool = False

    @property
    def baseline_name(self) -> str:
        return self.study_name + BASELINE_SUFFIX

    @property
    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.heartbeat_interval, self.grace_period, self.db_outage_grace)

    @property
    def resolved_data_dir(self) -> str | None:
        return resolve_data_dir(self.data_dir)

    def train_config(self, mode: str = "lora") -> TrainConfig:
        """The defaults of `mode` ("lora" or "full") with this study's epochs, seed, precision."""
        return run_config(mode, self.epochs, self.seed, self.mixed_precision)


_FIELDS = {f.name: f for f in fields(StudyConfig)}


def device_arg(value: str) -> str:
    """The argparse type of `--device`: a name PyTorch devices go by (whether that device
    exists is checked when training starts, with a clear error)."""
    if not is_device_name(value):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}; use {DEVICE_HELP}")
    return value


def check_confirm_counts(top: int, seeds: int, epochs: int | None) -> None:
    """`confirm`'s own numbers: how many configurations, seeds per configuration, epochs."""
    if top < 1 or seeds < 1:
        raise ConfigError("--top and --seeds must be at least 1")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")


def parse_trial_ref(which: str) -> str | int:
    """`--trial`: a trial number, `best` or `baseline`."""
    if which in ("best", "baseline"):
        return which
    try:
        number = int(which)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"--trial must be a trial number, best or baseline, not {which!r}")
    return number


def read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    doc = {k.replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return doc


def given_values(cli: dict[str, Any], file_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config file's values, then the flags that were given (None = not given)."""
    values = dict(file_values or {})
    values.update({k: v for k, v in cli.items() if k in _FIELDS and v is not None})
    # --storage, else the config file's, else $STUDY_STORAGE, else the default
    values["storage"] = resolve_url(cli.get("storage"), values.get("storage"))
    return values


def validate(cfg: StudyConfig) -> StudyConfig:
    def positive(name: str, value: Any, integer: bool = True) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (integer and not isinstance(value, int)) or value <= 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a positive number, got {value!r}"
            )

    positive("n_trials", cfg.n_trials)
    positive("epochs", cfg.epochs)
    positive("max_length", cfg.max_length)
    positive("workers", cfg.workers)
    positive("heartbeat_interval", cfg.heartbeat_interval)
    positive("grace_period", cfg.grace_period)
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError("--grace-period must be longer than --heartbeat-interval")
    if cfg.max_train_samples is not None:
        positive("max_train_samples", cfg.max_train_samples)
    if cfg.timeout is not None:
        positive("timeout", cfg.timeout, integer=False)
    positive("db_outage_grace", cfg.db_outage_grace, integer=False)
    positive("keep_top", cfg.keep_top)
    for name, allowed in (
        ("sampler", SAMPLERS),
        ("pruner", PRUNERS),
        ("keep", KEEP_POLICIES),
    ):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}")
    if not is_device_name(cfg.device):
        raise ConfigError(f"--device must be one of {DEVICE_HELP}, got {cfg.device!r}")
    if not cfg.study_name.strip():
        raise ConfigError("--study-name must not be empty")
    if cfg.study_name.endswith(BASELINE_SUFFIX):
        raise ConfigError(f"--study-name must not end with {BASELINE_SUFFIX}: that is the baseline")
    parse_url(cfg.storage)  # says what to type when the URL is wrong
    if cfg.progress is None:
        cfg = replace(cfg, progress=sys.stderr.isatty())
    return cfg
