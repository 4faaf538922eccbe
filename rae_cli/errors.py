"""The one base class for errors a user can act on: the CLI prints their message (no traceback) and exits 2."""


class RaeError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class DataError(RaeError, ValueError):
    """Input data that cannot be used: a missing folder, no images, a corrupt file, a wrong shape."""
