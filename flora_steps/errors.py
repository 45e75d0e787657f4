"""The one exception type for mistakes a user can fix (bad params, missing files)."""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a stack trace."""
