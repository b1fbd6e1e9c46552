"""``edgetrain``: the headless control panel, one module per command group."""
