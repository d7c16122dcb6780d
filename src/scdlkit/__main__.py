"""``python -m scdlkit``: the ``scdlkit`` command line."""

from scdlkit.cli import main

raise SystemExit(main())
