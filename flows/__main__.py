"""`python -m flows` is the `site-pipeline` CLI."""

import sys

from flows.cli import main

sys.exit(main())
