"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input (config, paths, shapes). Raised before any expensive work starts."""
