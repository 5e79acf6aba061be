"""The one exception type users see.

Everything that is the user's to fix (a missing file, a checkpoint of the wrong kind, a bad prompt
weight, no network) is raised as a `CCLDError` whose message is one line naming the problem and
the fix. The CLI prints it and exits with status 2; it never shows a traceback for these.

The same setting is `steps=` in Python, `--steps` on the command line and "Steps" in the web form,
so a message names a parameter with `arg("steps")` (the parameter itself) or `give("steps")` (how
to pass it: `steps=`, `--steps`), and each front-end words the names its own way
(`CCLDError.worded`); `str()` words them as Python keywords.
"""

from __future__ import annotations

import re
from typing import Callable

_MARK = "\x1f"  # brackets a parameter's name inside a message; never shown
_NAMED = re.compile(f"{_MARK}(=?)([A-Za-z_][A-Za-z0-9_]*)(?::([^{_MARK}]*))?{_MARK}")

# (parameter, how to give it?, what to give) -> the words a front-end shows
Words = Callable[[str, bool, str], str]


def arg(name: str) -> str:
    """A parameter named in a message: `steps` in Python, `--steps` on the command line."""
    return f"{_MARK}{name}{_MARK}"


def give(name: str, what: str = "") -> str:
    """How to pass a parameter, in a message's fix, with what to pass if it helps: `seed=SEED`
    in Python, `--seed SEED` on the command line (`what` "SEED")."""
    return f"{_MARK}={name}:{what}{_MARK}"


def python_words(name: str, giving: bool, what: str = "") -> str:
    return f"{name}={what}" if giving else name


def option_words(name: str, giving: bool, what: str = "") -> str:
    """A command-line option's spelling of a parameter (the CLI knows its exceptions)."""
    flag = "--" + name.replace("_", "-")
    return f"{flag} {what}" if giving and what else flag


class CCLDError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""

    @property
    def template(self) -> str:
        """The message with its parameters still marked, for wrapping it in another."""
        return str(self.args[0]) if self.args else ""

    @property
    def parameters(self) -> list[str]:
        """The parameters the message names, in order."""
        return [m[2] for m in _NAMED.finditer(self.template)]

    def worded(self, words: Words) -> str:
        """The message with each parameter named by `words(name, giving, what)`."""
        return _NAMED.sub(lambda m: words(m[2], bool(m[1]), m[3] or ""), self.template)

    def __str__(self) -> str:
        return self.worded(python_words)
