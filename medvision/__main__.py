"""``python -m medvision`` runs the command line."""

import sys

from medvision.cli.main import main

sys.exit(main())
