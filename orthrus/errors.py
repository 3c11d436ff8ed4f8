"""User-facing errors: the CLI prints their message without a traceback and exits non-zero."""


class OrthrusError(Exception):
    """A problem with the user's input (a path, a checkpoint, a parameter), with how to fix it."""
