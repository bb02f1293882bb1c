"""One error vocabulary: :class:`CtfreidError` for every mistake of the user (bad input, a damaged file,
a wrong option), whose message names the thing and what was expected.

It is a ``ValueError``, so ``except ValueError`` keeps working. The command line prints a
``CtfreidError`` (and ``OSError``s such as a missing file) as one line with exit code 2, and lets any
other exception show its traceback: a bug should look like a bug.
"""

from __future__ import annotations


class CtfreidError(ValueError):
    """A user error: bad input, a damaged or foreign file, an impossible option."""


def count(n: int, one: str, many: str) -> str:
    """``n`` and the noun for it, for messages: ``count(1, "identity", "identities")`` is "1 identity"."""
    return f"{n} {one if n == 1 else many}"
