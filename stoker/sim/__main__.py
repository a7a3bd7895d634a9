"""`python -m stoker.sim`: same as `stoker sim`."""

import sys

from stoker.sim.cli import main

sys.exit(main())
