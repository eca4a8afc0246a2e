"""`python -m raydist ...` is the `raydist` command (what a submitted job's entrypoint runs)."""

import sys

from raydist.cli import main

sys.exit(main())
