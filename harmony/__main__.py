"""``python -m harmony report ...``: the same as the ``harmony`` command."""

from harmony.tools.cli import main

raise SystemExit(main())
