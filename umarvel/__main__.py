"""``python -m umarvel ...``: the ``umarvel`` console script."""
import sys

from umarvel.cli import main

if __name__ == "__main__":
    sys.exit(main())
