"""`python -m flexip_core.training`: the same as `python -m flexip_core.training.train`."""
import sys

from flexip_core.training.train import main

sys.exit(main())
