"""`python -m lwhub` runs the `lwhub` command."""

import sys

from .cli import main

sys.exit(main())
