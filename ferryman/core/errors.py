"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an impossible setting.

    The CLI prints ``Error: <message>`` and exits with status 2. The message should name the
    file, field or flag at fault and, where it helps, what would be accepted.
    """


class ConfigError(UserError, ValueError):
    """A configuration value or override that cannot be accepted."""


def user_message(err: UserError) -> str:
    """The one line to show for ``err``. A ``UserError`` raised in a DataLoader worker process comes
    back from PyTorch as the same type with a traceback for a message ("Caught UserError in
    DataLoader worker process 0.\nOriginal Traceback ..."), whose last line is
    ``<module>.<ErrorType>: <the original message>``: that message is the line."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.partition(": ")[2] or last
