"""The one exception type users see: the CLI prints its message as one line and exits non-zero."""


class TidarError(Exception):
    """An error caused by user input or the environment, with a message that says what to do."""
