"""The exception types for mistakes a user can fix (bad params, missing files), and how an error reads in one line."""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a stack trace."""


class ParamsError(UserError):
    """Every problem of a params file, one line each; as a message, the first one and how many more."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = [f"{source}: {problem}" for problem in problems]
        more = len(problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''}: flora check --params {source})" if more else ""
        super().__init__(self.problems[0] + suffix)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
