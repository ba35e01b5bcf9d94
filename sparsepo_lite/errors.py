"""Errors a user can act on, beside the ``ValueError`` subclasses of the data and cache modules."""


class TrainingError(RuntimeError):
    """A run that cannot start or end well (its output_dir, its checkpoint, or skipped steps and
    non-finite weights); the message says what to change."""
