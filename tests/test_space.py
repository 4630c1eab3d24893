"""Search spaces: defaults, TOML overrides, and clear refusals of bad definitions."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from objectives.space import DEFAULT_SPACE, EXTENDED_SPACE, SpaceError, load_space


def test_default_space_is_rank_learning_rate_and_scheduler() -> None:
    specs = {p.name: p for p in DEFAULT_SPACE.params}
    assert set(specs) == {"lora_r", "learning_rate", "lr_scheduler"}
    assert (specs["lora_r"].low, specs["lora_r"].high, specs["lora_r"].log) == (4, 64, True)
    lr = specs["learning_rate"]
    assert (lr.low, lr.high, lr.log) == (5e-5, 5e-3, True)
    assert specs["lr_scheduler"].choices == ("linear", "cosine", "constant")


def test_suggest_stays_in_bounds_and_names_match_config_fields() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = EXTENDED_SPACE.suggest(trial)
        assert 4 <= params["lora_r"] <= 64 and isinstance(params["lora_r"], int)
        assert 5e-5 <= params["learning_rate"] <= 5e-3
        assert isinstance(params["use_dora"], bool)
        study.tell(trial, 0.0)
    from dataclasses import fields

    from objectives.config import TrainConfig

    assert {p.name for p in EXTENDED_SPACE.params} <= {f.name for f in fields(TrainConfig)}


def test_toml_overrides_some_parameters(tmp_path: Path) -> None:
    f = tmp_path / "space.toml"
    f.write_text('[lora_r]\nlow = 8\nhigh = 16\n\n[lr_scheduler]\nchoices = ["cosine"]\n')
    space = load_space(f)
    specs = {p.name: p for p in space.params}
    assert (specs["lora_r"].low, specs["lora_r"].high, specs["lora_r"].log) == (8, 16, False)
    assert specs["lr_scheduler"].choices == ("cosine",)
    assert specs["learning_rate"] == {p.name: p for p in DEFAULT_SPACE.params}["learning_rate"]
    assert space.definition() != DEFAULT_SPACE.definition()


def test_toml_can_extend_the_extended_space(tmp_path: Path) -> None:
    f = tmp_path / "space.toml"
    f.write_text('extends = "extended"\n[batch_size]\nchoices = [32]\n')
    assert "use_dora" in {p.name for p in load_space(f).params}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[lora_r]\nlow = 64\nhigh = 4\n", "low 64 is above high 4"),
        ("[learning_rate]\nlow = 0.0\nhigh = 0.01\nlog = true\n", "is not a number in \\(0, 1\\)"),
        ("[lora_dropout]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "log scale needs low > 0"),
        ("[lora_r]\nlow = -4\nhigh = 8\n", "is not an integer >= 1"),
        ("[lora_r]\nlow = 4.5\nhigh = 8\n", "is not an integer >= 1"),
        ("[lora_rank]\nlow = 4\nhigh = 8\n", "unknown parameter"),
        ('[lr_scheduler]\nchoices = ["linear", "warp"]\n', "'warp' is not one of"),
        ("[lr_scheduler]\nchoices = []\n", "non-empty list"),
        ("[lora_r]\nlow = 4\n", "needs both low and high"),
        ("[lora_r]\nlow = 4\nhigh = 8\nchoices = [4]\n", "either choices or low/high"),
        ("[lr_scheduler]\nlow = 1\nhigh = 2\n", "takes choices, not bounds"),
        ("[lora_r\nlow = 4\n", "not valid TOML"),
        ('extends = "huge"\n', "extends must be one of"),
    ],
)
def test_bad_space_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "space.toml"
    f.write_text(text)
    with pytest.raises(SpaceError, match=message):
        load_space(f)


def test_missing_space_file() -> None:
    with pytest.raises(SpaceError, match="not found"):
        load_space("/nonexistent/space.toml")
