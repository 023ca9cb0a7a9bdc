"""`python -m promptfleet.cli`: the same as the `promptfleet` command."""

from promptfleet.cli import main

main()
