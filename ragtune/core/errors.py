"""The one exception type the CLI prints as a plain message (no traceback): bad input, named and explained."""


class UserFacingError(RuntimeError):
    """Raise (or subclass) for problems the user fixes: say what was wrong, where, and what to do."""
