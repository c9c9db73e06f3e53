"""``python -m admmcompress ...``: the same command line (and exit status) as the ``admmcompress`` script."""

from admmcompress.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
