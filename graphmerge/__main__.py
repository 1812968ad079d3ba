"""``python -m graphmerge`` runs the command line."""

import sys

from graphmerge.cli import main

sys.exit(main())
