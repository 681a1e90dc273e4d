"""``python -m training``: see training/cli.py and ``python -m training --help``."""

import sys

from training.cli import command_line

sys.exit(command_line())
