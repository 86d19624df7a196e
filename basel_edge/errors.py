"""The one exception type for mistakes a user can fix (bad path, wrong format, out-of-range option)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits with status 2."""
