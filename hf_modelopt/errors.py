"""The errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(ValueError):
    """A problem in the recipe, the data or the models that the user can fix; the message says how."""
