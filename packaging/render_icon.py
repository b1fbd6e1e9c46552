"""Render EdgeTrain's icon (assets/edgetrain.svg) to the PNGs the GUI and the desktop
entry use: assets/edgetrain-{256,128,48}.png.

    QT_QPA_PLATFORM=offscreen .venv/bin/python packaging/render_icon.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SIZES = (256, 128, 48)


def render(svg: Path, size: int, out: Path) -> None:
    """Draw ``svg`` into a transparent ``size`` x ``size`` PNG at ``out``."""
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"error: {svg} is not a valid SVG (Qt could not parse it)")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(out), "PNG"):
        raise SystemExit(f"error: could not write {out}")


def main() -> int:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 (QPainter needs it)
    svg = ASSETS / "edgetrain.svg"
    for size in SIZES:
        out = ASSETS / f"edgetrain-{size}.png"
        render(svg, size, out)
        print(f"{out.relative_to(ASSETS.parent)}: {size}x{size}, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
