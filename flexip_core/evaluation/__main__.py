"""`python -m flexip_core.evaluation`: the same as `python -m flexip_core.evaluation.evaluate`."""
import sys

from flexip_core.evaluation.evaluate import main

sys.exit(main())
