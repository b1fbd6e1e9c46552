"""The desktop control panel (PySide6): thin views over :mod:`app.workspace`."""
