"""Errors a user can act on.

Every error raised for bad input is a :class:`PrunekitError`: stages and the CLI print its message
(no traceback) and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Bad input: a wrong params key, a missing checkpoint, an unsupported architecture, ..."""


class ParamsError(PrunekitError):
    """A params.yaml value that is missing, unknown or out of range; the message names the key."""
