"""`python -m h3fusion` == the `h3fusion` command."""

from h3fusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
