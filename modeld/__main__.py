"""`python -m modeld`: the daemon."""

from modeld.cli import main

main()
