"""Error types. A :class:`UserError` is bad input: the CLI prints its message and exits with 2."""


class UserError(Exception):
    """Bad input from the user (pattern, path, option). The message names the problem and the fix."""


class TrainingDiverged(UserError):
    """Training produced a non-finite loss or weights: the settings (most often the learning rate) are at fault."""
