"""Shared fixtures for the data tests: one prepared `digits` per test session."""

import pytest

from segjax.data.digits import prepare_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """A data_dir with `digits` prepared as ArrayRecord."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_digits(data_dir)
    return data_dir
