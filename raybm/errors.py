"""The one exception type users see.

Anything a user can cause (a bad path, a missing column, an unknown config key) raises a
subclass of ``RaybmError`` whose message says what is wrong and what to do. The CLI
prints the message without a traceback and exits with status 2.
"""


class RaybmError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(RaybmError):
    """A config file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(RaybmError):
    """Input data cannot be read or prepared (missing file, bad column, empty split)."""
