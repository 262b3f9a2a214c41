"""The synth package's error for input a user can get wrong (the CLI prints it as one ``Error:`` line)."""


class SynthError(Exception):
    """Input to ``synth`` that cannot be used as given; the message names the file and what would fit."""
