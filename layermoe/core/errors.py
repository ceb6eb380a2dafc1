"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class LayermoeError(Exception):
    """Bad input or a step run out of order. The message is one line that names the fix."""

    exit_code = 2


class StoppedWithWorkKept(LayermoeError):
    """A step refused what an earlier step of the same command measured: one line and exit 2 like bad input,
    but the work dir keeps what was done before it (an `extend` whose allocation refuses the profile's figures
    keeps that profile: minutes on a real model)."""
