"""Pytest fixtures for page tests on scripted texts (no model): import them by name, as store_fixtures does.

    from page_fixtures import serve, store  # noqa: F401  (pytest finds fixtures by name)
"""
from __future__ import annotations

import pytest

from test_ui_support import ScriptedServing, launch, page_store


@pytest.fixture
def store(tmp_path):
    """A new SQLite store with the page's prompt limit."""
    store = page_store(tmp_path / "feedback.db")
    yield store
    store.close()


@pytest.fixture
def serve(store, tmp_path):
    """Launch the page on scripted texts (no model) with the given options; close every page at the end."""
    launched = []

    def start(**options):
        page = launch(ScriptedServing(store, ["one", "two", "three"], tmp_path / "adapters"), store, **options)
        launched.append(page)
        return page

    yield start
    for page in launched:
        page.close()
