"""``python -m medix_fast.train`` (see ``cli.py``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
