"""``python -m fiber_data``: the ``fiber-data`` command line (:mod:`fiber_data.cli`)."""

from fiber_data.cli import main

raise SystemExit(main())
