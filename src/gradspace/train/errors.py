"""The errors a run reports as one line (the CLI maps each to its exit code), in a leaf module: any module may
raise them without importing the module that detects them (no import cycle through an error type)."""


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, truncated, of another format or saved for another run
    (exit code 2)."""


class RunDiverged(Exception):
    """The run finished and was saved, but its loss ended well above where it started (exit code 3)."""
