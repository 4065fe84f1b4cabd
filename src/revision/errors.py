"""One exception type for bad user input, so the CLI can print it cleanly and exit non-zero."""


class InputError(ValueError):
    """Bad input: a malformed file, a missing image, an unknown param. The message names the file and row/key."""
