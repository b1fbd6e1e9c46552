"""SVG figures to PNG with QtSvg (the sweep's figure, for ``edgetrain sweep`` and the GUI).

The controller writes its figures as SVG without any plotting library; where PySide6 is
installed (the ``[gui]`` extra) this renders them to PNG.  It works without a window: a
``QGuiApplication`` on the offscreen platform is made when none exists (text needs one
for its fonts).
"""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

_APP: QGuiApplication | None = None   # kept alive for the process once made here


def _ensure_app() -> None:
    global _APP
    if QGuiApplication.instance() is None:
        # no display is needed to rasterise; offscreen works on servers and under ssh
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        _APP = QGuiApplication(["edgetrain"])


def svg_to_png(svg: Path | str, png: Path | str | None = None, scale: float = 2.0) -> Path:
    """Render an SVG file to PNG at ``scale`` times its size; returns the PNG's path.

    Parameters
    ----------
    svg
        The SVG file.
    png
        Where to write (default: beside ``svg``, ``.png``).
    scale
        Pixels per SVG unit (2: sharp on high-density screens and in documents).

    Raises
    ------
    ValueError
        The SVG could not be read or the PNG not written.
    """
    _ensure_app()
    svg, png = Path(svg), Path(png) if png else Path(svg).with_suffix(".png")
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg}: not a valid SVG")
    size = renderer.defaultSize()
    image = QImage(round(size.width() * scale), round(size.height() * scale), QImage.Format_ARGB32)
    image.fill(Qt.white)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.Antialiasing)
    painter.setRenderHint(QPainter.TextAntialiasing)
    renderer.render(painter, QRectF(0, 0, image.width(), image.height()))
    painter.end()
    if not image.save(str(png), "PNG"):
        raise ValueError(f"{png}: could not write the PNG")
    return png
