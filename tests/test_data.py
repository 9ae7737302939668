"""attnkit.data: one configurable data root, independent of where the package is installed."""

from pathlib import Path

import pytest

from attnkit import data


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_path("pope", "x.json") == tmp_path / "pope" / "x.json"


def test_checkout_uses_shared_data(monkeypatch):
    monkeypatch.delenv("ATTNKIT_DATA", raising=False)
    root, why = data.data_root()
    repo = Path(data.__file__).resolve().parents[1]
    if (repo.parent / "shared" / "data").is_dir():
        assert root == repo.parent / "shared" / "data" and "checkout" in why
    else:
        assert root == data.user_data_dir()


def test_outside_a_checkout_the_per_user_directory_and_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(data, "_checkout_data", lambda: None)
    assert data.data_dir() == tmp_path / "attnkit"
    with pytest.raises(FileNotFoundError) as err:
        data.data_path("truthfulqa", "TruthfulQA.csv", must_exist=True)
    message = str(err.value)
    assert str(tmp_path / "attnkit") in message and "per-user" in message and "ATTNKIT_DATA=" in message
