"""The one exception type users see.

Everything that is the user's to fix (a missing file, a checkpoint of the wrong kind, a bad prompt
weight, no network) is raised as a `CCLDError` whose message is one line naming the problem and
the fix. The CLI prints it and exits with status 2; it never shows a traceback for these.
"""


class CCLDError(Exception):
    """A problem the user can fix; its message says what and how, in one line."""
