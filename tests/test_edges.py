"""The space-edge check on constructed trials: is the best trial pressing against a bound?"""

from __future__ import annotations

import tomllib

import pytest

from objectives.record import TrialRecord
from objectives.space import DEFAULT_SPACE, EXTENDED_SPACE, parse_space
from reports.edges import edge_lines, space_edges, widened_space


def lora(number: int, val_f1: float, state: str = "COMPLETE", **params) -> TrialRecord:
    base = {"lora_r": 16, "learning_rate": 1e-3, "lr_scheduler": "linear"}
    return TrialRecord(
        study="s", number=number, state=state, baseline=False, mode="lora",
        params={**base, **params}, val_f1=val_f1,
    )  # fmt: skip


def test_best_trial_at_the_upper_learning_rate_bound_is_named_with_the_bound():
    records = [lora(0, 0.90, learning_rate=4.6e-3), lora(1, 0.80), lora(2, 0.70)]
    edges = space_edges(records, DEFAULT_SPACE)
    assert [(e.param, e.side, e.bound, e.best_at_edge) for e in edges] == [
        ("learning_rate", "high", 5e-3, True)
    ]
    (line,) = edge_lines(edges)
    assert line.startswith("learning_rate: the best trial (learning_rate = 0.0046) lies in")
    assert "high bound 0.005" in line


def test_trials_inside_the_range_raise_nothing():
    records = [lora(i, 0.9 - i / 100, learning_rate=lr) for i, lr in enumerate([2e-3, 1e-3, 5e-4])]
    assert space_edges(records, DEFAULT_SPACE) == []


def test_the_log_scale_decides_for_log_parameters():
    # 1e-4 is in the lowest 1% of [5e-5, 5e-3] on a linear scale, but 15% of the way on the
    # log scale the sampler uses: not at the edge.
    assert space_edges([lora(0, 0.9, learning_rate=1e-4)], DEFAULT_SPACE) == []
    # 5.5e-5 is 2% of the way on the log scale: at the low edge.
    (edge,) = space_edges([lora(0, 0.9, learning_rate=5.5e-5)], DEFAULT_SPACE)
    assert (edge.param, edge.side) == ("learning_rate", "low")


def test_most_of_the_top_five_at_an_edge_counts_even_when_the_best_is_not():
    records = [lora(0, 0.95, lora_r=16)] + [lora(i, 0.9 - i / 100, lora_r=60) for i in (1, 2, 3)]
    records += [lora(4, 0.80, lora_r=16), lora(5, 0.50, lora_r=60)]  # 6th best: not in the top 5
    (edge,) = space_edges(records, DEFAULT_SPACE)
    assert (edge.param, edge.side, edge.best_at_edge, edge.top_at_edge, edge.top) == (
        "lora_r", "high", False, 3, 5
    )  # fmt: skip
    assert edge_lines([edge]) == [
        "lora_r: 3 of the top 5 lie in the outer tenth of its range, near its high bound 64; "
        "the optimum may lie beyond it."
    ]
    # two of five is not most of them
    records[3] = lora(3, 0.87, lora_r=16)
    assert space_edges(records, DEFAULT_SPACE) == []


def test_categorical_parameters_and_other_trials_are_ignored():
    records = [
        lora(0, 0.9, lr_scheduler="constant", use_dora=True),
        # pruned, failed and baseline trials at the edge do not count
        lora(1, 0.99, state="PRUNED", learning_rate=5e-3),
        lora(2, None, state="FAIL", learning_rate=5e-3),
        TrialRecord(
            study="s-full-ft",
            number=0,
            state="COMPLETE",
            baseline=True,
            mode="full",
            params={},
            val_f1=0.99,
        ),  # fmt: skip
    ]
    assert space_edges(records, EXTENDED_SPACE) == []
    assert space_edges([], DEFAULT_SPACE) == []
    # the baseline's higher F1 does not hide a LoRA trial at the edge
    records[0] = lora(0, 0.9, learning_rate=5e-3)
    assert [e.param for e in space_edges(records, EXTENDED_SPACE)] == ["learning_rate"]


def test_widened_space_moves_each_bound_that_was_hit_and_parses_as_a_space_file():
    records = [lora(0, 0.9, learning_rate=4.9e-3, lora_r=4)]
    edges = space_edges(records, DEFAULT_SPACE)
    assert {(e.param, e.side) for e in edges} == {("learning_rate", "high"), ("lora_r", "low")}
    lines = widened_space(DEFAULT_SPACE, edges)
    assert lines == [
        "lora_r = { low = 1, high = 64, log = true }",
        "learning_rate = { low = 5e-05, high = 0.05, log = true }",
    ]
    doc = tomllib.loads("\n".join(lines))
    # half the log range further out: a decade for the learning rate, two octaves for the rank
    assert doc == {
        "learning_rate": {"low": 5e-5, "high": 0.05, "log": True},
        "lora_r": {"low": 1, "high": 64, "log": True},
    }
    wider = {p.name: p for p in parse_space(doc).params}
    assert (wider["lr_scheduler"].choices, wider["lora_r"].low) == (
        ("linear", "cosine", "constant"),
        1,
    )


def test_a_bound_the_parameter_cannot_pass_is_not_moved():
    # dropout 0 cannot go lower; the learning rate must stay below 1
    records = [lora(0, 0.9, lora_dropout=0.0, learning_rate=0.5)]
    space = parse_space(
        {"extends": "extended", "learning_rate": {"low": 0.01, "high": 0.6, "log": True}}
    )
    edges = space_edges(records, space)
    assert {(e.param, e.side) for e in edges} == {
        ("lora_dropout", "low"), ("learning_rate", "high")
    }  # fmt: skip
    doc = tomllib.loads("\n".join(widened_space(space, edges)))
    assert set(doc) == {"learning_rate"}
    assert 0.6 < doc["learning_rate"]["high"] < 1


@pytest.mark.parametrize("value", [4, 5])
def test_integer_bounds_stay_integers(value):
    (edge,) = space_edges([lora(0, 0.9, lora_r=value)], DEFAULT_SPACE)
    doc = tomllib.loads("\n".join(widened_space(DEFAULT_SPACE, [edge])))
    assert doc["lora_r"]["low"] == 1 and isinstance(doc["lora_r"]["low"], int)


def test_report_note_and_terminal_say_when_the_best_trial_is_at_an_edge(tmp_path):
    """The check reaches the three places a user reads: REPORT.md, the dashboard note and the
    end-of-run table's checks; a study without a stored space gets no such section."""
    from test_reports import SPACE, baseline_trial, lora_trial, new_study

    from objectives.record import to_records
    from reports.comparison import compare
    from reports.write import write_reports
    from study.notes import study_note
    from study.terminal import format_checks

    space = parse_space({"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}})
    assert {p.name: (p.low, p.high) for p in space.params if p.choices is None} == {
        name: (d.low, d.high) for name, d in SPACE.items() if hasattr(d, "low")
    }  # the trials' own distributions
    study, baseline = new_study("s"), new_study("s-full-ft")
    study.add_trials([lora_trial(16, 9.6e-4, [0.5, 0.9]), lora_trial(8, 1e-4, [0.4, 0.6], seed=1)])
    baseline.add_trial(baseline_trial())
    expected = "learning_rate: the best trial (learning_rate = 0.00096) lies"
    toml = "`learning_rate = { low = 1e-05, high = 0.01, log = true }`"

    write_reports(study, baseline, tmp_path / "none")  # no stored space: not judged
    assert "Is the search space big enough?" not in (tmp_path / "none" / "REPORT.md").read_text()

    study.set_user_attr("space", space.definition())  # what `optimize` stores
    write_reports(study, baseline, tmp_path / "report")
    report = (tmp_path / "report" / "REPORT.md").read_text()
    section = report.split("## Is the search space big enough?\n", 1)[1]
    assert section.startswith(f"\n- {expected}")
    assert f"- {toml}" in section

    lora, base = study.get_trials(), baseline.get_trials()
    note = study_note("s", lora, base, "s-full-ft", space=space)
    assert f"### Is the search space big enough?\n\n- {expected}" in note and toml in note

    records = to_records(lora, "s") + to_records(base, "s-full-ft", baseline=True)
    terminal = format_checks(compare(records, study_name="s", space=space))
    assert f"Is the search space big enough?\n- {expected}" in terminal and toml in terminal


def test_a_space_without_edges_says_so_and_no_trial_says_not_judged():
    records = [lora(0, 0.9, learning_rate=1e-3)]
    from reports.edges import space_check_lines

    assert space_check_lines(records, DEFAULT_SPACE) == [
        "Yes, as far as the trials show: neither the best trial nor most of the top 5 lie in "
        "the outer tenth of the range of lora_r, learning_rate."
    ]
    assert space_check_lines([lora(0, 0.9, state="PRUNED")], DEFAULT_SPACE) == [
        "Not judged: no COMPLETE LoRA trial yet."
    ]
