"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class CifarxError(Exception):
    """A problem the user can fix (bad path, bad value, mismatched classes...)."""


class TrainingInterrupted(CifarxError):
    """Ctrl-C during training: a checkpoint was written and the run can be resumed."""
