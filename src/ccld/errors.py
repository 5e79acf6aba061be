"""The one exception type users see.

Everything that is the user's to fix (a missing file, a checkpoint of the wrong kind, a bad prompt
weight, no network) is raised as a `CCLDError` whose message is one line naming the problem and
the fix. The CLI prints it and exits with status 2; it never shows a traceback for these.
"""

import contextlib
import contextvars
import functools
import inspect
import re


class CCLDError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""


# The same problem is fixed with an option on the command line and with a keyword argument in
# Python. The model loaders name the options (`--cloob-config`); a Python entry point decorated
# with `in_python_terms` names its keyword (`cloob_config=`) instead, unless a `ccld` command,
# inside `command_line()`, is the caller.

_running_a_command = contextvars.ContextVar("ccld_running_a_command", default=False)


@contextlib.contextmanager
def command_line():
    """Marks what runs inside as a `ccld` command's, whose messages name its options."""
    token = _running_a_command.set(True)
    try:
        yield
    finally:
        _running_a_command.reset(token)


def in_python_terms(function):
    """Decorates a Python entry point: outside a command, a CCLDError from inside it that names
    the option of one of its parameters (`--cloob-config` for `cloob_config`) names the keyword
    argument instead (`cloob_config=`)."""
    keywords = [name for name in inspect.signature(function).parameters if name != "cls"]
    # longest first, so that --cloob-config is not read as --cloob followed by "-config"
    options = sorted((f"--{name.replace('_', '-')}" for name in keywords), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(option) + r"(?![\w-])" for option in options))

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except CCLDError as e:
            if _running_a_command.get():
                raise
            message = pattern.sub(lambda m: m[0][2:].replace("-", "_") + "=", str(e))
            raise CCLDError(message) from None

    return wrapper
