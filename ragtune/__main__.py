"""`python -m ragtune ...` is the same as `ragtune ...`."""

import sys

from ragtune.cli import main

sys.exit(main())
