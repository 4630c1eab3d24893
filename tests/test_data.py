"""Data: reading, validation, the fixed stratified split, subsampling, both sources, fingerprint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import import_or_require, make_rows, write_intent_csv

from objectives import data as D


def test_split_is_stratified_repeatable_and_disjoint(tiny_data_dir: Path) -> None:
    a = D.load_data(tiny_data_dir)
    b = D.load_data(tiny_data_dir)
    assert a.fingerprint == b.fingerprint and a.val.texts == b.val.texts
    (train_texts, _), (test_texts, _) = D.load_local(tiny_data_dir)
    # 320 rows, 4 intents x 80: validation takes 10% = 32, eight per intent
    assert len(a.val.texts) == 32 and len(a.train.texts) == 288
    assert Counter(a.val.labels.tolist()) == {0: 8, 1: 8, 2: 8, 3: 8}
    # train + val is exactly the training file (as a multiset), test is exactly the test file
    assert Counter(a.train.texts + a.val.texts) == Counter(train_texts)
    assert a.test.texts == test_texts
    assert a.label_names == sorted(a.label_names)


def test_validation_split_does_not_depend_on_subsample(tiny_data_dir: Path) -> None:
    full = D.load_data(tiny_data_dir)
    small = D.load_data(tiny_data_dir, max_train_samples=40)
    assert small.val.texts == full.val.texts
    assert len(small.train.texts) == 40
    assert Counter(small.train.labels.tolist()) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert set(small.train.texts) <= set(full.train.texts)
    assert small.fingerprint != full.fingerprint


def test_hub_and_local_sources_give_the_same_ids(tiny_data_dir: Path) -> None:
    datasets = import_or_require("datasets")
    (tr_x, tr_y), (te_x, te_y) = D.load_local(tiny_data_dir)
    # The Hub's ClassLabel lists intents in the publisher's order, not sorted.
    names = sorted(set(tr_y), reverse=True)
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    dsd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": tr_x, "label": [names.index(y) for y in tr_y]}, features=feats
            ),
            "test": datasets.Dataset.from_dict(
                {"text": te_x, "label": [names.index(y) for y in te_y]}, features=feats
            ),
        }
    )
    train, test = D.from_hub_dataset(dsd)
    hub = D.build_data(train, test, "hub")
    local = D.load_data(tiny_data_dir)
    assert hub.label_names == local.label_names
    np.testing.assert_array_equal(hub.train.labels, local.train.labels)
    np.testing.assert_array_equal(hub.test.labels, local.test.labels)
    assert hub.fingerprint == local.fingerprint


def test_unreachable_hub_names_the_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = import_or_require("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'PolyAI/banking77' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match="Hub") as e:
        D.load_data(None)
    assert "--data-dir" in str(e.value) and D.DATA_DIR_ENV in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,label\nhello,a\n", "lacks the column"),
        ("text,category\n,card_arrival\n", "no text"),
        ("text,category\n1234,card_arrival\n", "no text"),
        ('text,category\n"unclosed quote,card_arrival\n', "not a valid CSV"),
        ("text,category\nhello there,card_arrival,extra\n", "has 3 fields"),
        ("text,category\nhello there\n", "has 1 fields"),
        ("text,category\n", "no rows"),
        ("", "empty"),
    ],
)
def test_bad_training_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "train.csv").write_text(content)
    write_intent_csv(tmp_path / "test.csv", make_rows(2, seed=0))
    with pytest.raises(D.DataError, match=message):
        D.load_data(tmp_path)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="data folder not found"):
        D.load_data(tmp_path / "nope")
    write_intent_csv(tmp_path / "train.csv", make_rows(5, seed=0))
    with pytest.raises(D.DataError, match="not found"):
        D.load_data(tmp_path)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    write_intent_csv(tmp_path / "test.csv", make_rows(2, seed=0))
    with pytest.raises(D.DataError, match="cannot read"):
        D.load_data(tmp_path)


def test_test_intent_unseen_in_training_is_refused(tmp_path: Path) -> None:
    write_intent_csv(tmp_path / "train.csv", make_rows(5, seed=0))
    write_intent_csv(tmp_path / "test.csv", [("where is my parcel", "parcel_tracking")])
    with pytest.raises(D.DataError, match="never seen in training: parcel_tracking"):
        D.load_data(tmp_path)


def test_subsample_smaller_than_label_set_is_refused(tiny_data_dir: Path) -> None:
    with pytest.raises(D.DataError, match="below the number of intents"):
        D.load_data(tiny_data_dir, max_train_samples=3)


def test_real_banking77_split(banking77_dir: Path) -> None:
    d = D.load_data(banking77_dir)
    assert d.num_labels == 77
    assert (len(d.train.texts), len(d.val.texts), len(d.test.texts)) == (9002, 1001, 3080)
    # stratified: every intent is in validation, in proportion to its training count
    counts = np.bincount(d.val.labels, minlength=77)
    assert counts.min() >= 1
    sub = D.load_data(banking77_dir, max_train_samples=1500)
    assert len(sub.train.texts) == 1500
    # Banking77 is imbalanced (32 to 168 examples an intent): the subsample keeps the proportions
    expected = np.bincount(d.train.labels) * 1500 / len(d.train.labels)
    assert np.abs(np.bincount(sub.train.labels, minlength=77) - expected).max() <= 1


def test_encode_truncates_and_keeps_labels(tiny_data_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    data = D.load_data(tiny_data_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = D.encode(data, tok, max_length=5)
    assert len(enc.train) == len(data.train.texts)
    assert max(len(x) for x in enc.train.input_ids) == 5
    assert enc.train.labels.tolist() == data.train.labels.tolist()
