"""``python -m scdlkit.cli``: the ``scdlkit`` command line."""

from scdlkit.cli._main import main

raise SystemExit(main())
