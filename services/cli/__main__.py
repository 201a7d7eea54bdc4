"""`python -m services.cli` is the `afd` command."""

import sys

from services.cli import main

sys.exit(main())
