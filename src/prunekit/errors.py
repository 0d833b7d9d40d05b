"""Errors a user can act on.

Every error raised for bad input is a :class:`PrunekitError`: stages and the CLI print its message
(no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Bad input: a wrong params key, a missing checkpoint, an unsupported architecture, ..."""


class ParamsError(PrunekitError):
    """A params.yaml value that is missing, unknown or out of range; the message names the key."""


def is_network_error(e: BaseException) -> bool:
    """Whether ``e`` is a transport failure (no route, refused, timed out) of httpx / requests or the standard
    library, recognised by class name so that callers do not depend on which HTTP client a library uses."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & NETWORK_ERRORS)


NETWORK_ERRORS = {"TransportError", "RequestError", "ConnectionError", "Timeout", "TimeoutException", "TimeoutError"}
