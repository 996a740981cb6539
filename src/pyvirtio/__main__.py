"""``python -m pyvirtio`` runs the command line."""

import sys

from pyvirtio.cli.main import main

sys.exit(main())
