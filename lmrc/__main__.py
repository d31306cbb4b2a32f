import sys

from lmrc.cli import main

sys.exit(main())
