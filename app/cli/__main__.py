"""``python -m app.cli``: the same as the ``edgetrain`` command."""
import sys

from app.cli.main import main

sys.exit(main())
