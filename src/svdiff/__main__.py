"""`python -m svdiff …`, which is how `accelerate launch -m svdiff train …` and `torchrun -m svdiff train …` start
the command line."""

import sys

from .cli import main

sys.exit(main())
