"""`python -m worker …`: operator commands (see worker.cli)."""

import sys

from worker.cli import main

sys.exit(main())
