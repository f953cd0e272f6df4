"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an impossible setting.

    The CLI prints ``Error: <message>`` and exits with status 2. The message should name the
    file, field or flag at fault and, where it helps, what would be accepted.
    """


class ConfigError(UserError, ValueError):
    """A configuration value or override that cannot be accepted."""
