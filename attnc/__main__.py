"""`python -m attnc`: the attnc command."""
import sys

from attnc.cli import main

sys.exit(main())
