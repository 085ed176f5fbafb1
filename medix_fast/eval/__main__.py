"""``python -m medix_fast.eval``: see ``cli.py``."""
import sys

from .cli import main

sys.exit(main())
