"""Open the report's index.html in a real headless browser (Debian's chromium) with no network.

The page must render every plotly figure (each figure div holds plotly's "main-svg" SVG after the
scripts ran) and log nothing to the console: no uncaught error, no failed load. Chromium runs
with the flags this closed network needs (no background or component traffic) and a resolver
rule that fails every host lookup, so a script fetched from a CDN would break the page and show
up here. A screenshot is saved under tmp_path and checked to hold more than a blank page.

Skipped when /usr/bin/chromium is absent (a failure in CI, where .ci/run installs it with
`apt-get install chromium`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import require
from matplotlib.image import imread
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from reports.write import write_reports

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    if not CHROMIUM.exists():
        require("Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium)")


SPACE = {
    "lora_r": IntDistribution(4, 64, log=True),
    "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    "lr_scheduler": CategoricalDistribution(["linear", "cosine", "constant"]),
}
LABELS = [f"intent_{i:02d}" for i in range(12)]
TIMEOUT_S = 90


def _confusion(accuracy: float, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    n = len(LABELS)
    counts = np.zeros((n, n), dtype=int)
    for i in range(n):
        counts[i, i] = round(20 * accuracy)
        for j in rng.integers(0, n, 20 - counts[i, i]):
            counts[i, j] += 1
    return counts.tolist()


def _trial(
    number: int, curve: list[float], *, full: bool = False, pruned: bool = False
) -> FrozenTrial:
    rng = np.random.default_rng(number)
    r = int(2 ** rng.integers(2, 7))
    trainable = 109_500_000 if full else 600_000 + 36_864 * r
    attrs = {
        "mode": "full" if full else "lora",
        "trainable_params": trainable,
        "total_params": 110_000_000,
        "train_time_s": 600.0 if full else 90.0 + 2 * r + float(rng.normal(0, 5)),
        "setup_time_s": 0.0,
        "epochs_run": len(curve),
        "best_epoch": int(np.argmax(curve)) + 1,
        "max_epochs": 4,
        "val_f1": max(curve),
    }
    if not pruned:
        attrs.update(
            test_f1=max(curve) - 0.01,
            labels=LABELS,
            test_confusion=_confusion(max(curve) - 0.01, number),
        )
    if full:
        params = {"learning_rate": 1e-4, "lr_scheduler": "linear"}
        distributions = {
            "learning_rate": FloatDistribution(1e-4, 1e-4),
            "lr_scheduler": CategoricalDistribution(["linear"]),
        }
    else:
        params = {
            "lora_r": r,
            "learning_rate": float(10 ** rng.uniform(-5, -3)),
            "lr_scheduler": ["linear", "cosine", "constant"][number % 3],
        }
        distributions = SPACE
    return create_trial(
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        value=None if pruned else max(curve),
        params=params,
        distributions=distributions,
        intermediate_values={e: v for e, v in enumerate(curve, start=1)},
        user_attrs=attrs,
    )


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    """A complete report: 12 COMPLETE and 3 PRUNED LoRA trials and one baseline run."""
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="banking77", direction="maximize", storage=storage)
    baseline = optuna.create_study(
        study_name="banking77-full-ft", direction="maximize", storage=storage
    )
    for number in range(12):
        top = 0.80 + 0.01 * number
        study.add_trial(_trial(number, [top - 0.3, top - 0.1, top - 0.02, top]))
    for number in range(12, 15):
        study.add_trial(_trial(number, [0.3, 0.4], pruned=True))
    baseline.add_trial(_trial(99, [0.6, 0.8, 0.9, 0.93], full=True))
    out = tmp_path / "report"
    write_reports(study, baseline, out)
    return out


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium once on a file:// URL; stdout is the DOM with --dump-dom."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # Every host lookup fails: a page that needs the network breaks visibly.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        # Console messages of the page go to stderr as "INFO:CONSOLE..." lines.
        "--enable-logging=stderr",
        "--v=0",
        # Lets plotly's scripts run to completion before the DOM or screenshot is taken.
        "--virtual-time-budget=10000",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def page_errors(stderr: str) -> list[str]:
    """Console output of the page and uncaught errors (the page itself logs nothing)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def figure_chunks(dom: str) -> list[str]:
    """The DOM split at each figure div, so each chunk holds one figure's rendered markup."""
    return re.split(r'<div id="figure-\d+"', dom)[1:]


def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The check below would see a broken page: an uncaught error and a missing library."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><body><div id='p'></div>"
        "<script>console.error('bad data');</script>"
        "<script>Plotly.newPlot('p', []);</script></body></html>"
    )
    result = chromium(page, tmp_path / "profile", "--dump-dom")
    errors = page_errors(result.stderr)
    assert any("bad data" in line for line in errors), result.stderr[-2000:]
    assert any("Plotly is not defined" in line for line in errors), result.stderr[-2000:]


def test_index_html_renders_every_plot_offline(report_dir: Path, tmp_path: Path) -> None:
    index = report_dir / "index.html"
    n_figures = index.read_text().count('<div id="figure-')
    assert n_figures == 8  # two fronts, importance, history, epochs, per class, two confusions

    dom_run = chromium(index, tmp_path / "profile-dom", "--dump-dom")
    assert dom_run.returncode == 0, dom_run.stderr[-2000:]
    assert page_errors(dom_run.stderr) == []
    chunks = figure_chunks(dom_run.stdout)
    assert len(chunks) == n_figures
    for i, chunk in enumerate(chunks):
        assert 'class="main-svg"' in chunk, f"figure-{i} did not render"
    assert "Findings" in dom_run.stdout and "banking77-full-ft" in dom_run.stdout

    screenshot = tmp_path / "index.png"
    shot_run = chromium(
        index,
        tmp_path / "profile-shot",
        f"--screenshot={screenshot}",
        "--window-size=1400,3000",
        "--hide-scrollbars",
    )
    assert shot_run.returncode == 0, shot_run.stderr[-2000:]
    assert page_errors(shot_run.stderr) == []
    pixels = imread(screenshot)
    assert pixels.shape[:2] == (3000, 1400)
    # Plots, not a blank page: a good share of the pixels are neither white nor near-white.
    inked = (pixels[..., :3].min(axis=-1) < 0.9).mean()
    assert inked > 0.02, f"screenshot {screenshot} looks blank ({inked:.1%} inked)"
