"""`python -m busx` is the `busx` command."""

import sys

from .cli import main

sys.exit(main())
