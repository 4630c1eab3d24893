"""The search space: which `TrainConfig` fields a trial samples, and over what.

`default` and `extended` are built in; a TOML file overrides parameters by name, one table each
with bounds or choices, on top of either (the format: docs/methodology.md, "Search space").
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from objectives.config import LORA_TARGETS, TrainConfig
from objectives.errors import UserError

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


class SpaceError(UserError):
    """A bad search-space definition: the message is meant for the user."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if _FIELD_TYPES[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def as_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


# What each parameter may take, checked for every space (defaults included).
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_FIELD_TYPES = {f.name: _TYPES[f.type] for f in fields(TrainConfig)}
# parameter -> (the check every value must pass, how it is described when it does not)
_ALLOWED: dict[str, tuple[Any, str]] = {
    "lora_r": (lambda v: v >= 1, "an integer >= 1"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lr_scheduler": (lambda v: v in SCHEDULERS, "one of " + ", ".join(SCHEDULERS)),
    "lora_alpha_ratio": (lambda v: v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: v in LORA_TARGETS, "one of " + ", ".join(LORA_TARGETS)),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "weight_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


@dataclass(frozen=True)
class Space:
    params: tuple[ParamSpec, ...]

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def definition(self) -> str:
        """Canonical JSON of the space: two studies may share trials only if these are equal."""
        return json.dumps({p.name: p.as_dict() for p in self.params}, sort_keys=True)


DEFAULT_SPACE = Space(
    (
        ParamSpec("lora_r", 4, 64, log=True),
        ParamSpec("learning_rate", 5e-5, 5e-3, log=True),
        ParamSpec("lr_scheduler", choices=("linear", "cosine", "constant")),
    )
)
EXTENDED_SPACE = Space(
    DEFAULT_SPACE.params
    + (
        ParamSpec("lora_alpha_ratio", 0.5, 4.0, log=True),
        ParamSpec("lora_dropout", 0.0, 0.2),
        ParamSpec("target_modules", choices=tuple(LORA_TARGETS)),
        ParamSpec("use_rslora", choices=(False, True)),
        ParamSpec("use_dora", choices=(False, True)),
        ParamSpec("weight_decay", 0.0, 0.2),
        ParamSpec("warmup_ratio", 0.0, 0.15),
        ParamSpec("batch_size", choices=(16, 32, 64)),
    )
)
BUILTIN_SPACES = {"default": DEFAULT_SPACE, "extended": EXTENDED_SPACE}


def parse_param(name: str, table: Any) -> ParamSpec:
    """Validate one TOML table into a ParamSpec."""
    where = f"search space [{name}]"
    if name not in _ALLOWED:
        raise SpaceError(f"{where}: unknown parameter; known: {', '.join(_ALLOWED)}")
    if not isinstance(table, dict):
        raise SpaceError(f"{where}: expected a table with low/high or choices")
    unknown = set(table) - {"low", "high", "log", "choices"}
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    (ok, text), kind = _ALLOWED[name], _FIELD_TYPES[name]

    def check(v: Any) -> Any:
        if kind is bool:
            good = isinstance(v, bool)
        elif kind is str:
            good = isinstance(v, str)
        else:
            good = isinstance(v, int | float) and not isinstance(v, bool)
            good = good and (kind is float or float(v).is_integer()) and math.isfinite(v)
        if not good or not ok(v):
            raise SpaceError(f"{where}: {v!r} is not {text}")
        return int(v) if kind is int else float(v) if kind is float else v

    if "choices" in table:
        if set(table) - {"choices"}:
            raise SpaceError(f"{where}: give either choices or low/high, not both")
        choices = table["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        values = tuple(check(v) for v in choices)
        if len(set(values)) != len(values):
            raise SpaceError(f"{where}: choices repeat a value")
        return ParamSpec(name, choices=values)
    if kind not in (int, float):
        raise SpaceError(f"{where}: a {kind.__name__} parameter takes choices, not bounds")
    if "low" not in table or "high" not in table:
        raise SpaceError(f"{where}: needs both low and high (or choices)")
    low, high = check(table["low"]), check(table["high"])
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false")
    if low > high:
        raise SpaceError(f"{where}: low {low} is above high {high}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log scale needs low > 0, got {low}")
    return ParamSpec(name, low, high, log=log)


def parse_space(doc: dict) -> Space:
    doc = dict(doc)
    base_name = doc.pop("extends", "default")
    if base_name not in BUILTIN_SPACES:
        raise SpaceError(f"search space: extends must be one of {', '.join(BUILTIN_SPACES)}")
    specs = {p.name: p for p in BUILTIN_SPACES[base_name].params}
    for name, table in doc.items():
        specs[name] = parse_param(name, table)
    return Space(tuple(specs.values()))


def load_space(spec: str | Path | None) -> Space:
    """A built-in space by name (`default`, `extended`), a TOML file's overrides, or the JSON
    `Space.definition()` a study stores (how a resumed study gets its space back)."""
    if spec is None or str(spec) in BUILTIN_SPACES:
        return BUILTIN_SPACES[str(spec or "default")]
    if str(spec).lstrip().startswith("{"):
        try:
            return parse_space(json.loads(str(spec)))
        except (json.JSONDecodeError, SpaceError) as e:
            raise SpaceError(f"stored search-space definition is not valid: {e}") from None
    path = Path(spec)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpaceError(f"search-space file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"cannot read search-space file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"search-space file {path} is not valid TOML: {e}") from None
    try:
        return parse_space(doc)
    except SpaceError as e:
        raise SpaceError(f"{path}: {e}") from None


def stored_space(definition: object) -> Space | None:
    """The space a study stored as its `Space.definition()`, or None where there is none."""
    if not isinstance(definition, str) or not definition.lstrip().startswith("{"):
        return None
    try:
        return load_space(definition)
    except SpaceError:
        return None
