"""`python -m hf_lorafa.cli …`, as the `hf-lorafa` console script."""

import sys

from .commands import main

sys.exit(main())
