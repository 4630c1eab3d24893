"""The settings of `python -m study bench` (`BenchConfig`) and their checks (`validate_bench`).

Importable without torch: the command line builds its parser and refuses bad flags from here.
The settings a bench shares with a study (model, data, budget, seed, device, token length) become
a `StudyConfig`, so the data folder and the training configuration follow the study's rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from objectives.config import TrainConfig
from study.config import ConfigError, StudyConfig

MODES = ("full", "lora")


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

    def study_config(self) -> StudyConfig:
        """The study these settings describe (the study's defaults for everything else)."""
        return StudyConfig(
            model=self.model,
            data_dir=self.data_dir,
            max_train_samples=self.max_train_samples,
            epochs=self.epochs,
            seed=self.seed,
            device=self.device,
            max_length=self.max_length,
        )

    def train_config(self) -> TrainConfig:
        """The study's run configuration of this mode, at the bench's batch size if given."""
        run = self.study_config().train_config(self.mode)
        return replace(run, batch_size=self.batch_size) if self.batch_size else run


def validate_bench(cfg: BenchConfig) -> BenchConfig:
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}")
    for name in ("epochs", "repeats", "max_length", "batch_size", "max_train_samples"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {cfg.warmup}")
    return cfg
