"""`python -m glassformer …` is the `glassformer` command."""

import sys

from glassformer.cli import main

sys.exit(main())
