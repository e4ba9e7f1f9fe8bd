"""Text someone else wrote, made safe to print: one line, bounded, every control character escaped."""

from __future__ import annotations


def printable(text: object, limit: int = 200) -> str:
    r"""Return ``text`` (as ``str``) cut to ``limit`` characters, each non-printable one escaped (``\n``, ``\x1b``).

    For a peer's words on their way into a log line, an error message or a terminal: a newline
    cannot forge a second log line, a carriage return or an ANSI escape cannot rewrite the screen.
    """
    cut = str(text)[:limit]
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
