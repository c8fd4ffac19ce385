"""``python -m sluice_cli`` is the ``sluice`` command."""

from sluice_cli.main import main

main()
