"""`python -m netvlad` runs the CLI."""

from netvlad.cli import main

main()
