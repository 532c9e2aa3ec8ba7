"""``python -m harmony report ...``: the same as the ``harmony`` command."""

from harmony.cli import main

raise SystemExit(main())
