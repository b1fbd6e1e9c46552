"""Entry point of the desktop bundle (packaging/bundle.sh): started without arguments
(from the menu, a double-click) it opens the control panel; with arguments it is the
``edgetrain`` command line, so ``edgetrain plan ...`` and ``edgetrain gui --check`` work
from the bundle too."""
from __future__ import annotations

import sys

from app.cli.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["gui"]))
