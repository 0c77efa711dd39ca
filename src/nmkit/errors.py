"""Error types. A :class:`UserError` is bad input: the CLI prints its message and exits with 2."""


class UserError(Exception):
    """Bad input from the user (pattern, path, option). The message names the problem and the fix."""
