"""The ``synth`` command line: ``cli.py`` is the group, one module per command (or pair of commands)."""
