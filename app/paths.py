"""Where EdgeTrain keeps the user's files on the controller."""
from __future__ import annotations

import os
from pathlib import Path


def edgetrain_home() -> Path:
    """EdgeTrain's state directory (``$EDGETRAIN_HOME``, default ``~/.edgetrain``)."""
    return Path(os.environ.get("EDGETRAIN_HOME") or Path.home() / ".edgetrain")


def default_runs_dir() -> Path:
    """Run records: one ``runs/<run id>/`` directory per run."""
    return edgetrain_home() / "runs"


def default_known_hosts() -> Path:
    """EdgeTrain's own known_hosts (the trusted domain), unless an inventory names another."""
    return edgetrain_home() / "known_hosts"
