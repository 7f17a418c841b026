"""The one exception type the command-line tools turn into a one-line error and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: unknown model, bad override, missing file, corrupt checkpoint."""
