"""``python -m admmcompress ...``: the same command line (and exit status) as the ``admmcompress`` script."""

from admmcompress.cli import entry

if __name__ == "__main__":
    entry()
