"""``python -m jaxprune``: the same command line as the ``jaxprune`` script."""

from jaxprune.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
