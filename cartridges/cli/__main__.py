"""``python -m cartridges.cli``: the same as the ``cartridges`` console script."""

import sys

from cartridges.cli import main

sys.exit(main())
