"""``python -m cartridges.cli``: the same as the ``cartridges`` console script."""

from cartridges.cli import entry

entry()
