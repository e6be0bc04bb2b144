"""User-facing errors.

Anything a user can cause (a missing file, a corrupt header, a bad config key) raises a
:class:`MedsegError` subclass whose message names the file or key and the problem. The CLI
prints the message and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class ConfigError(MedsegError, ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


class InputError(MedsegError):
    """An input file or folder is missing, unreadable or not what was expected."""


class GeometryError(InputError):
    """Two volumes that should share physical space do not."""
