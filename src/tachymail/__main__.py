"""``python -m tachymail`` runs the command line."""

import sys

from tachymail.cli.main import main

sys.exit(main())
