"""The run configuration of the `optimize` and `baseline` commands.

Precedence: command-line flags > a `--config FILE.toml` (keys are the field names below) >
the defaults here.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from objectives.data import DATA_DIR_ENV
from storage import DEFAULT_URL

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("hyperband", "median", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
BASELINE_SUFFIX = "-full-ft"


class ConfigError(ValueError):
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
    progress: bool = True

    @property
    def baseline_name(self) -> str:
        return self.study_name + BASELINE_SUFFIX

    @property
    def resolved_data_dir(self) -> str | None:
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or None


_FIELDS = {f.name: f for f in fields(StudyConfig)}


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


def make_config(cli: dict[str, Any], file_values: dict[str, Any] | None = None) -> StudyConfig:
    """Merge defaults, config file and the flags that were given (None = not given)."""
    values = dict(file_values or {})
    values.update({k: v for k, v in cli.items() if k in _FIELDS and v is not None})
    return validate(replace(StudyConfig(), **values))


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
    if cfg.max_train_samples is not None:
        positive("max_train_samples", cfg.max_train_samples)
    if cfg.timeout is not None:
        positive("timeout", cfg.timeout, integer=False)
    for name, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("device", DEVICES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}")
    if not cfg.study_name.strip():
        raise ConfigError("--study-name must not be empty")
    if cfg.study_name.endswith(BASELINE_SUFFIX):
        raise ConfigError(f"--study-name must not end with {BASELINE_SUFFIX}: that is the baseline")
    return cfg
