"""`python -m plipy`: the same as the `plipy` command."""

from plipy.cli import main

main()
