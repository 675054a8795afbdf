"""`python -m flexip_core`: see flexip_core.cli."""
import sys

from .cli import main

sys.exit(main())
