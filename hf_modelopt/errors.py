"""The errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""

import reprlib

# Longest excerpt of the user's input an error message quotes: a recipe value can be megabytes (or an alias
# bomb's expansion), and the message must stay one readable line.
EXCERPT_CHARS = 80
# reprlib stops at these sizes while it walks a value, so even a huge nested one costs a few dozen steps.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT_CHARS


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """`repr(value)` cut to `limit` characters with an ellipsis (repr escapes newlines and control characters)."""
    return clip(_REPR.repr(value), limit)


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line (control characters escaped), cut to `limit` characters with an ellipsis."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class UserError(ValueError):
    """A problem in the recipe, the data or the models that the user can fix; the message says how."""


class UnsupportedModelError(UserError):
    """A technique was asked to work on a model architecture, head or structure it does not support
    (`hf_modelopt.compat.require_support` raises it, one line, before any work)."""


class RecipeError(UserError):
    """A recipe problem: `source: key: what was expected`."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
