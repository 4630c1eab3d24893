"""The `dashboard` command and what `optimize` writes for it (study note, Pareto custom plots).

The server tests run the real command (`python -m study dashboard`) as a subprocess on a free
port and talk to it over HTTP, like a browser would: one finds both studies and checks the server
listens on the loopback address only, one polls it while a real `optimize` writes to the same
SQLite file (reading must not break writing), one checks the warning for a non-loopback address.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from helpers import default_sigint
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from optuna_dashboard import get_note

from study import notes
from study.cli import main
from study.dashboard import dashboard_url, exposure_warning, is_loopback
from study.notes import FIGURE_IDS, dashboard_figures, study_note
from study.terminal import TRIAL_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120  # the command imports torch and transformers; CI machines can be slow
STOP_TIMEOUT_S = 10
LOCK_ERRORS = ("database is locked", "OperationalError", "Traceback")


def optimize_args(model: Path, data: Path, url: str, *extra: str) -> list[str]:
    return [
        "optimize", "--model", str(model), "--data-dir", str(data), "--storage", url,
        "--device", "cpu", "--no-progress", "--max-train-samples", "120", *extra,
    ]  # fmt: skip


# --- pure parts --------------------------------------------------------------------------------

SPACE = {
    "lora_r": IntDistribution(4, 64, log=True),
    "learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
    "lr_scheduler": CategoricalDistribution(["linear", "cosine", "constant"]),
}


def lora_trial(number: int, val: float, test: float, params: int, time_s: float) -> FrozenTrial:
    t = create_trial(
        value=val,
        params={"lora_r": 8, "learning_rate": 3e-4, "lr_scheduler": "cosine"},
        distributions=SPACE,
        user_attrs={
            "mode": "lora",
            "trainable_params": params,
            "total_params": 110_000_000,
            "trainable_share_pct": 100 * params / 110_000_000,
            "train_time_s": time_s,
            "setup_time_s": 0.0,
            "val_f1": val,
            "test_f1": test,
            "epochs_run": 6,
        },  # fmt: skip
    )
    t.number = number
    return t


def baseline_trial() -> FrozenTrial:
    t = create_trial(
        value=0.93,
        params={"learning_rate": 1e-4},
        distributions={"learning_rate": FloatDistribution(1e-5, 1e-3, log=True)},
        user_attrs={
            "mode": "full",
            "trainable_params": 109_000_000,
            "total_params": 109_000_000,
            "trainable_share_pct": 100.0,
            "train_time_s": 400.0,
            "setup_time_s": 0.0,
            "val_f1": 0.93,
            "test_f1": 0.925,
            "epochs_run": 6,
        },  # fmt: skip
    )
    t.number = 0
    return t


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_warning(host: str) -> None:
    assert is_loopback(host) and exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "my-laptop.example.org"])
def test_other_hosts_warn_about_no_authentication(host: str) -> None:
    warning = exposure_warning(host)
    assert warning is not None and not is_loopback(host)
    assert "no authentication" in warning and "change or delete" in warning and host in warning


def test_dashboard_url() -> None:
    assert dashboard_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard"
    assert dashboard_url("::1", 8081) == "http://[::1]:8081/dashboard"
    assert dashboard_url("192.168.1.7", 80) == "http://192.168.1.7:80/dashboard"
    # all interfaces: print the address that works on this machine
    assert dashboard_url("0.0.0.0", 8080) == "http://127.0.0.1:8080/dashboard"
    assert dashboard_url("::", 8080) == "http://[::1]:8080/dashboard"


def test_note_puts_the_best_lora_trial_beside_the_baseline() -> None:
    lora = [
        lora_trial(0, 0.90, 0.99, 300_000, 100.0),  # best test F1, but test never chooses
        lora_trial(1, 0.91, 0.90, 1_090_000, 150.0),
        lora_trial(2, 0.88, 0.87, 150_000, 80.0),
    ]
    pruned = create_trial(
        state=TrialState.PRUNED,
        params={"lora_r": 4},
        distributions={"lora_r": SPACE["lora_r"]},
        intermediate_values={1: 0.2},
    )
    note = study_note("banking77", [*lora, pruned], [baseline_trial()], "banking77-full-ft")
    assert "| trial | " + " | ".join(TRIAL_COLUMNS) + " |" in note
    best_row = next(line for line in note.splitlines() if line.startswith("| #1 |"))
    assert "1,090,000" in best_row and "0.9100" in best_row
    assert any(line.startswith("| baseline #0 | full |") for line in note.splitlines())
    assert "Best LoRA trial #1 against the full fine-tuning baseline" in note
    assert "0.9100 vs 0.9300: 2.00 points below the baseline" in note
    assert "1.00% of the baseline's" in note and "0.38x the baseline's" in note
    assert "4 trials (3 complete, 1 pruned, 0 failed)" in note
    assert "**val_macro_f1**" in note


def test_note_before_any_trial_says_what_is_missing() -> None:
    note = study_note("s", [], [], "s-full-ft")
    assert "No COMPLETE LoRA trial yet" in note and "No COMPLETE baseline run" in note
    assert "| trial |" not in note


def test_figures_mark_the_baseline_and_fit_the_dashboard_card() -> None:
    lora = [lora_trial(i, 0.8 + i / 100, 0.8, 100_000 * (i + 1), 50.0 + i) for i in range(4)]
    figures = dashboard_figures(lora, [baseline_trial()], "banking77", "banking77-full-ft")
    assert set(figures) == set(FIGURE_IDS.values())
    for fig in figures.values():
        assert fig.layout.height is None  # the dashboard's card sets the height
        assert "full fine-tuning baseline" in [trace.name for trace in fig.data]


def test_a_failed_refresh_warns_and_never_stops_the_study(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(notes, "publish", broken)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    study.optimize(
        lambda t: t.suggest_float("x", 0, 1),
        n_trials=2,
        callbacks=[notes.DashboardNotes(storage, "missing-full-ft")],
    )
    assert len(study.trials) == 2
    err = capsys.readouterr().err
    assert err.count("warning: could not update the dashboard note: disk full") == 2


# --- optimize writes the note and the plots -----------------------------------------------------


@pytest.fixture(scope="module")
def optimized_url(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard')}/optuna.db"
    args = optimize_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "1", "--n-trials", "2")
    args += ["--pruner", "none"]  # both trials COMPLETE, so the note has a best trial
    assert main(args) == 0
    return url


def test_optimize_keeps_the_note_and_plots_current(optimized_url: str) -> None:
    study = optuna.load_study(study_name="banking77", storage=optimized_url)
    baseline = optuna.load_study(study_name="banking77-full-ft", storage=optimized_url)
    assert study.metric_names == ["val_macro_f1"]
    note = get_note(study)
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"Best LoRA trial #{best.number} against the full fine-tuning baseline" in note
    assert "2 trials (" in note and "| baseline #0 | full |" in note
    storage = optuna.storages.RDBStorage(optimized_url)
    keys = storage.get_study_system_attrs(storage.get_study_id_from_name("banking77"))
    # Written once before the first trial, then after each of the 2 trials.
    assert keys["dashboard:note_ver"] == 3
    for figure_id in FIGURE_IDS.values():
        assert f"dashboard:plot_data:{figure_id}:0" in keys
    assert "Full fine-tuning baseline of `banking77`" in get_note(baseline)


# --- the real server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        return json.load(response)


@dataclass
class Server:
    proc: subprocess.Popen
    base: str  # http://host:port
    stdout: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        """Send `sig`, wait, and return the exit code, all of stdout and all of stderr."""
        self.proc.send_signal(sig)
        start = time.monotonic()
        rest_out, err = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        assert time.monotonic() - start < STOP_TIMEOUT_S
        return self.proc.returncode, "".join(self.stdout) + rest_out, err


@contextmanager
def dashboard(url: str, port: int, *extra: str) -> Iterator[Server]:
    """Start `python -m study dashboard` and wait until it prints its URL (the port is bound)."""
    cmd = [sys.executable, "-m", "study", "dashboard", "--storage", url, "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # the tests stop it with Ctrl-C
    )
    lines: queue.Queue[str] = queue.Queue()
    server = Server(proc, "")

    def first_line() -> None:
        line = proc.stdout.readline()
        lines.put(line)

    threading.Thread(target=first_line, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"the dashboard printed nothing in {START_TIMEOUT_S} s")
        if " at http://" not in line:
            proc.kill()
            pytest.fail(f"dashboard did not start: {line!r} {proc.communicate()[1]}")
        server.stdout.append(line)
        server.base = line.split(" at ")[1].split("/dashboard")[0]
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from Linux's /proc (IPv4, IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(address) == 8:  # IPv4, little-endian hex
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    found.add(f"ipv6:{address}")
    return found


def non_loopback_address() -> str | None:
    """An address of this machine on a real interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks a route
            address = s.getsockname()[0]
        except OSError:
            address = socket.gethostbyname(socket.gethostname())
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_server_shows_both_studies_on_loopback_only_and_stops_cleanly(optimized_url: str) -> None:
    port = free_port()
    with dashboard(optimized_url, port) as server:
        assert server.base == f"http://127.0.0.1:{port}"
        assert server.stdout[0].startswith(f"optuna-dashboard for {optimized_url} at ")
        studies = get_json(f"{server.base}/api/studies")["study_summaries"]
        names = {s["study_name"]: s["study_id"] for s in studies}
        assert set(names) == {"banking77", "banking77-full-ft"}, studies
        detail = get_json(f"{server.base}/api/studies/{names['banking77']}")
        assert detail["objective_names"] == ["val_macro_f1"]
        assert len(detail["trials"]) == 2
        assert "Best LoRA trial #" in detail["note"]["body"]
        assert {g["id"] for g in detail["plotly_graph_objects"]} == set(FIGURE_IDS.values())

        # Listening on 127.0.0.1 only: the kernel's socket table, and a refused connection on
        # this machine's other address where it has one.
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"127.0.0.1"}
        other = non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=3).close()

        code, out, err = server.stop(signal.SIGINT)
    assert code == 0, err
    assert "dashboard stopped" in out and "Traceback" not in err and "warning" not in err
    with pytest.raises(OSError):  # the port is closed
        socket.create_connection(("127.0.0.1", port), timeout=3).close()


def test_another_host_prints_the_warning_and_sigterm_stops_it(optimized_url: str) -> None:
    port = free_port()
    with dashboard(optimized_url, port, "--host", "0.0.0.0") as server:
        assert server.base == f"http://127.0.0.1:{port}"
        assert get_json(f"{server.base}/api/studies")["study_summaries"]
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"0.0.0.0"}
        code, _, err = server.stop(signal.SIGTERM)
    assert code == 0, err
    assert exposure_warning("0.0.0.0") in err.splitlines()


@pytest.mark.parametrize(
    "storage, extra, message",
    [
        ("postgres://u:secret@localhost/db", [], "postgresql://"),
        ("sqlite:///{tmp}/missing.db", [], "no storage at"),
        ("sqlite:///{db}", ["--port", "70000"], "--port must be between 0 and 65535"),
        ("sqlite:///{db}", ["--port", "{busy}"], "cannot serve on 127.0.0.1:"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    optimized_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    storage: str,
    extra: list[str],
    message: str,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {
            "tmp": str(tmp_path),
            "db": optimized_url.removeprefix("sqlite:///"),
            "busy": str(busy.getsockname()[1]),
        }
        args = ["dashboard", "--storage", storage.format(**fill)]
        args += [e.format(**fill) for e in extra]
        code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "secret" not in err
    assert not (tmp_path / "missing.db").exists()


# --- reading must not break writing -------------------------------------------------------------


@dataclass
class Polls:
    rounds: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    trials_seen: int = 0


def poll(base: str, stop: threading.Event, polls: Polls) -> None:
    """What an open dashboard page does, faster: list the studies, then load each one's detail."""
    while not stop.is_set():
        try:
            studies = get_json(f"{base}/api/studies")["study_summaries"]
            polls.requests += 1
            for s in studies:
                detail = get_json(f"{base}/api/studies/{s['study_id']}")
                polls.requests += 1
                if s["study_name"] == "banking77":
                    polls.trials_seen = len(detail["trials"])
        except (OSError, AssertionError, ValueError) as e:  # HTTP errors are OSErrors
            polls.errors.append(repr(e))
        polls.rounds += 1
        stop.wait(0.2)


def test_dashboard_polling_does_not_break_a_running_optimize(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    from storage import get_storage

    url = f"sqlite:///{tmp_path}/optuna.db"
    get_storage(url)  # an empty storage, as a user has who opens the dashboard first
    n_trials = 4
    start = time.monotonic()
    with dashboard(url, free_port()) as server:
        polls, stop = Polls(), threading.Event()
        poller = threading.Thread(target=poll, args=(server.base, stop, polls), daemon=True)
        poller.start()
        args = optimize_args(
            tiny_model_dir, tiny_data_dir, url, "--epochs", "2", "--n-trials", str(n_trials)
        )
        optimize = subprocess.run(
            [sys.executable, "-m", "study", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        time.sleep(0.5)  # one more round after the last write
        stop.set()
        poller.join(timeout=60)
        code, _, server_err = server.stop()
    wall = time.monotonic() - start
    print(
        f"\nread-while-writing: {n_trials} trials, {polls.rounds} poll rounds,"
        f" {polls.requests} requests, {len(polls.errors)} errors, {wall:.1f} s"
    )
    assert optimize.returncode == 0, optimize.stderr[-3000:]
    assert not [e for e in LOCK_ERRORS if e in optimize.stderr], optimize.stderr[-3000:]
    assert "could not update the dashboard note" not in optimize.stderr
    study = optuna.load_study(study_name="banking77", storage=url)
    assert len(study.trials) == n_trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    [base] = optuna.load_study(study_name="banking77-full-ft", storage=url).trials
    assert base.state == TrialState.COMPLETE
    assert polls.rounds >= 5 and not polls.errors, polls.errors[:5]
    assert polls.trials_seen == n_trials  # the dashboard saw the last write
    assert code == 0 and not [e for e in LOCK_ERRORS if e in server_err], server_err[-3000:]
