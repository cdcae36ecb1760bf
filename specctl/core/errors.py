"""The one error type users see: a clear one-line message, exit code 2, no traceback."""


class SpecctlError(Exception):
    """Bad input or an impossible setting. The CLI prints `error: <message>` and exits with code 2."""
