"""`python -m mlakit` (and `accelerate launch -m mlakit`) runs the CLI."""

from mlakit.cli import main

main()
