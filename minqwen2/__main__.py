"""``python -m minqwen2`` is the ``minqwen2`` command."""

import sys

from minqwen2.tools.cli import main

sys.exit(main())
