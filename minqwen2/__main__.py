"""``python -m minqwen2`` is the ``minqwen2`` command.

(``MINQWEN2_EXERCISE`` needs nothing here: the loader installs lesson exercises for every
command that loads a model, ``minqwen2/exercises.py``.)
"""

import sys

from minqwen2.tools.cli import main

sys.exit(main())
