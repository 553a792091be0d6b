"""Errors services raise; the API maps them to HTTP statuses, the CLI to exit codes."""


class NotFoundError(LookupError):
    """The thing asked for does not exist."""


class ConflictError(ValueError):
    """The request clashes with what is stored."""


class InvalidInputError(ValueError):
    """The input is malformed; the message says what to fix."""


class TooLargeError(InvalidInputError):
    """The request or file is bigger than the configured limit, which the message names."""


class LengthRequiredError(InvalidInputError):
    """A request body of unknown length where the limit must be checked first."""


class UnauthorizedError(PermissionError):
    """Nobody is logged in, or the credentials are wrong: log in first."""


class ForbiddenError(PermissionError):
    """The request is understood, but this volunteer or account may not do it."""
