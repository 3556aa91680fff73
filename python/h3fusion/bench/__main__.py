"""`python -m h3fusion.bench` == `h3fusion bench`."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
