"""Errors services raise; the API maps them to HTTP statuses, the CLI to exit codes."""


class NotFoundError(LookupError):
    """The thing asked for does not exist."""


class ConflictError(ValueError):
    """The request clashes with what is stored."""


class InvalidInputError(ValueError):
    """The input is malformed; the message says what to fix."""
