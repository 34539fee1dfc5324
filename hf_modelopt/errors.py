"""The errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(ValueError):
    """A problem in the recipe, the data or the models that the user can fix; the message says how."""


class RecipeError(UserError):
    """A recipe problem: `source: key: what was expected`."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
