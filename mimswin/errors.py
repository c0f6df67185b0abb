"""User-facing errors: each carries a one-line message that says what is wrong and where."""


class MimswinError(Exception):
    """Base class of errors caused by the user's input, reported as one line without a stack trace."""


class ConfigError(MimswinError):
    """A config file or override is malformed, names an unknown key or has a value of the wrong type."""


class DataError(MimswinError):
    """A data source is missing, empty or unreadable."""


class CheckpointError(MimswinError):
    """A checkpoint is missing, unsafe, or belongs to another architecture."""


class TrainingError(MimswinError):
    """Training cannot go on (e.g. the loss stayed non-finite for too many steps in a row)."""
