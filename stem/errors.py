"""The one exception type a user sees: a sentence that says what went wrong and what to do."""


class StemError(Exception):
    """Bad input, settings or environment, reported to the user as one clear sentence (no traceback)."""
