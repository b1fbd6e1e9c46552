"""Runs: job config from settings, the launcher, telemetry, run state and records, the sweep."""
