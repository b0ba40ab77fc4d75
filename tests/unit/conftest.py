"""Fixtures shared by the unit tests."""

import pytest
from data_fixtures import make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny locally trained tokenizer (with a chat template) in a fresh directory, one per test module."""
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d
