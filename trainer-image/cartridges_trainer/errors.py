"""The one error type that means "retrying cannot help": the entry point maps it to ``EXIT_PERMANENT``."""


class InputError(ValueError):
    """The trainer's inputs are unusable (empty or missing corpus, p larger than the corpus, model mismatch)."""
