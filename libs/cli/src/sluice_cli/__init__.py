"""The ``sluice`` command: generate, bench, the local stack and trace viewing."""
