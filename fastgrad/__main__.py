"""``python -m fastgrad``: the same as the ``fastgrad`` command."""

from fastgrad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
