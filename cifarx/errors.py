"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class CifarxError(Exception):
    """A problem the user can fix (bad path, bad value, mismatched classes...)."""


class TrainingInterrupted(CifarxError):
    """Ctrl-C during training: a checkpoint was written and the run can be resumed."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """'did you mean X? ' for the nearest of `choices` to a mistyped `name` (as click suggests commands), else ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""
