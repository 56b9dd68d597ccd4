"""``python -m gid ...``: the ``gid`` command."""

import sys

from gid.cli import main

sys.exit(main())
