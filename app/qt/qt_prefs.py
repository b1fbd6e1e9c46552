"""What the control panel remembers between starts, and its light and dark themes.

The window's geometry and dock layout, the theme and the last session live in one INI
file under ``$EDGETRAIN_HOME`` (not the platform's registry or ``~/.config``), so a test
or a second EdgeTrain home never touches the user's.  The last session itself is an
ordinary session file (``last-session.json``) written when the window closes and opened
at the next start when no inventory or session is given.
"""
from __future__ import annotations

import enum
import logging
from pathlib import Path

from PySide6.QtCore import QByteArray, QObject, QSettings, Qt
from PySide6.QtGui import QAction, QActionGroup, QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication, QMainWindow, QMenuBar

from app.paths import edgetrain_home

log = logging.getLogger("edgetrain.qt")
#: Bumped when the docks change, so an old layout is not forced onto new docks.
LAYOUT_VERSION = 3


class Theme(enum.Enum):
    """The palette: the system's choice, or one forced."""

    SYSTEM = "system"
    LIGHT = "light"
    DARK = "dark"


def settings_path() -> Path:
    return edgetrain_home() / "gui.ini"


def last_session_path() -> Path:
    return edgetrain_home() / "last-session.json"


def session_to_restore(inventory: Path | str | None, session: Path | str | None) -> Path | str | None:
    """The session a start opens: the one asked for; else, when no inventory is asked for
    either, the last one (if a window wrote it); else none."""
    if session or inventory:
        return session
    last = last_session_path()
    return last if last.is_file() else None


def _settings() -> QSettings:
    return QSettings(str(settings_path()), QSettings.IniFormat)


def saved_theme() -> Theme:
    """The theme chosen last (``SYSTEM`` when none was, or the file says something else)."""
    try:
        return Theme(str(_settings().value("theme", Theme.SYSTEM.value)))
    except ValueError:
        return Theme.SYSTEM


def system_is_dark() -> bool:
    """Whether the desktop asks for a dark scheme (Qt >= 6.5 reads it from the platform)."""
    hints = QGuiApplication.styleHints()
    return hints.colorScheme() == Qt.ColorScheme.Dark


def _light() -> QPalette:
    pal = QPalette()
    for role, colour in ((QPalette.Window, "#f5f6f8"), (QPalette.Base, "#ffffff"),
                         (QPalette.AlternateBase, "#f3f5f7"), (QPalette.Button, "#eceef1"),
                         (QPalette.Highlight, "#2f6fb5"), (QPalette.HighlightedText, "#ffffff"),
                         (QPalette.ToolTipBase, "#ffffe1")):
        pal.setColor(role, QColor(colour))
    return pal


def _dark() -> QPalette:
    pal = QPalette()
    for role, colour in ((QPalette.Window, "#2b2d31"), (QPalette.WindowText, "#e6e6e6"),
                         (QPalette.Base, "#1f2023"), (QPalette.AlternateBase, "#27292d"),
                         (QPalette.Text, "#e6e6e6"), (QPalette.Button, "#34363b"),
                         (QPalette.ButtonText, "#e6e6e6"), (QPalette.BrightText, "#ff6b6b"),
                         (QPalette.Highlight, "#3d7fc9"), (QPalette.HighlightedText, "#ffffff"),
                         (QPalette.ToolTipBase, "#34363b"), (QPalette.ToolTipText, "#e6e6e6"),
                         (QPalette.PlaceholderText, "#8b8e94"), (QPalette.Link, "#7ab4f5")):
        pal.setColor(role, QColor(colour))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        pal.setColor(QPalette.Disabled, role, QColor("#7a7d83"))
    return pal


def apply_theme(app: QApplication, theme: Theme) -> bool:
    """Set the Fusion style with the light or dark palette ``theme`` asks for.

    Returns
    -------
    bool
        Whether the dark palette was applied.
    """
    app.setStyle("Fusion")
    dark = system_is_dark() if theme is Theme.SYSTEM else theme is Theme.DARK
    app.setPalette(_dark() if dark else _light())
    app.setProperty("edgetrain_dark", dark)
    return dark


class QtPrefs(QObject):
    """Restores a window's layout and theme and saves them (and the session) on close.

    Parameters
    ----------
    window
        The main window; its docks and toolbars need object names (they have them).
    """

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.theme = saved_theme()
        app = QApplication.instance()
        if app is not None:
            # a desktop that switches between light and dark is followed while SYSTEM is chosen
            QGuiApplication.styleHints().colorSchemeChanged.connect(self._on_system_scheme)

    def restore_layout(self) -> bool:
        """Put the window back where and how it was; False when nothing (usable) was saved."""
        s = _settings()
        if int(s.value("layout_version", 0) or 0) != LAYOUT_VERSION:
            return False
        geom, state = s.value("geometry"), s.value("state")
        ok = isinstance(geom, QByteArray) and self.window.restoreGeometry(geom)
        return bool(isinstance(state, QByteArray) and self.window.restoreState(state, LAYOUT_VERSION) and ok)

    def add_menu(self, bar: QMenuBar) -> dict[Theme, QAction]:
        """A *View → Theme* menu: follow the system, light or dark (one checked)."""
        menu = bar.addMenu("&View").addMenu("Theme")
        group = QActionGroup(menu)
        group.setExclusive(True)
        acts: dict[Theme, QAction] = {}
        for theme, text in ((Theme.SYSTEM, "Follow the system"), (Theme.LIGHT, "Light"), (Theme.DARK, "Dark")):
            act = QAction(text, menu, checkable=True)
            act.setChecked(theme is self.theme)
            act.triggered.connect(lambda _=False, t=theme: self.set_theme(t))
            group.addAction(act)
            menu.addAction(act)
            acts[theme] = act
        self.theme_actions = acts
        return acts

    def set_theme(self, theme: Theme) -> bool:
        """Apply ``theme`` now and remember it; returns whether it is dark."""
        self.theme = theme
        s = _settings()
        s.setValue("theme", theme.value)
        s.sync()
        return apply_theme(QApplication.instance(), theme)

    def _on_system_scheme(self, *_: object) -> None:
        if self.theme is Theme.SYSTEM and QApplication.instance() is not None:
            apply_theme(QApplication.instance(), Theme.SYSTEM)

    def save(self, save_session) -> None:
        """Remember the layout and theme, and write the session with ``save_session(path)``.

        A failure to write is logged, never raised: closing the window must not fail.
        """
        s = _settings()
        s.setValue("layout_version", LAYOUT_VERSION)
        s.setValue("geometry", self.window.saveGeometry())
        s.setValue("state", self.window.saveState(LAYOUT_VERSION))
        s.setValue("theme", self.theme.value)
        s.sync()
        if s.status() != QSettings.NoError:
            log.warning("could not save the window layout to %s", settings_path())
        try:
            save_session(last_session_path())
        except (OSError, ValueError) as exc:
            log.warning("could not save the last session to %s: %s", last_session_path(), exc)
        try:
            QGuiApplication.styleHints().colorSchemeChanged.disconnect(self._on_system_scheme)
        except (RuntimeError, TypeError):
            pass
