"""The one exception type for user mistakes: the CLIs print its message on one line and exit 2."""


class UserError(ValueError):
    """Bad input from the user (a flag, a value, a file). The message names the input and the fix."""
