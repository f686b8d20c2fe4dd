"""The one base class of user errors: bad input, a missing file, a damaged store, an invalid config.

Every package raises subclasses of `MamFusionError` for problems the user can fix, and `flows.cli` prints them
as one line (no traceback) with exit code 2. Anything else is a bug and keeps its traceback. It lives here,
in a module without imports, so `models/` (pure PyTorch) can use it without depending on the rest of storage.
"""

from __future__ import annotations


class MamFusionError(Exception):
    """A problem with the user's input or files; the message names the file/line/field and what to do."""

    def __str__(self) -> str:  # KeyError-derived subclasses would print the message quoted
        return str(self.args[0]) if self.args else self.__class__.__name__


def clean_reason(text: str) -> str:
    """A message on one printable line: decoder logs carry NULs and line breaks into JSON reports and logs."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())
