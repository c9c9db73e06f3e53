"""``python -m admmcompress ...``: the same command line as the ``admmcompress`` script."""

from admmcompress.cli import main

if __name__ == "__main__":
    main()
