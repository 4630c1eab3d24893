"""`UserError`, the one base class of the errors that mean "bad input" (the command line prints
its message on one line and exits 2), and `first_line`; nothing here imports torch."""


class UserError(ValueError):
    """Bad input: the message is meant for the user and says what to change."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): library errors
    can span a screen, and a user error is one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
