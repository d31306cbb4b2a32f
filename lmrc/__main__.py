import sys

from lmrc.cli import run

sys.exit(run())
