"""Shared test set-up: Qt offscreen before any QApplication, an isolated EDGETRAIN_HOME."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _edgetrain_home(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.edgetrain from a test."""
    home = tmp_path_factory.mktemp("edgetrain-home")
    monkeypatch.setenv("EDGETRAIN_HOME", str(home))
    yield home
