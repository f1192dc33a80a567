"""What every command shares: one error type for bad input, one argument-parser style.

A bad input (a missing file, a corrupt checkpoint, a flag out of range) ends every command the same
way: one line `<prog>: error: <what was wrong with which input, and what to do>`, exit status 1
(argparse's own errors: 2), and no traceback. Anything else is a bug and keeps its traceback.
"""
import argparse
import sys


class UserError(Exception):
    """A bad input; the message is one line naming the input and the fix."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of a usage dump."""

    def error(self, message):
        command = f"python {self.prog}" if self.prog.endswith(".py") else f"python -m {self.prog}"
        self.exit(2, f"{self.prog}: error: {message} (see {command} --help)\n")


def run(prog, main, *args, **kwargs):
    """main(*args, **kwargs), with a UserError turned into the one-line exit."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        sys.exit(f"{prog}: error: {e}")


def reason(e, limit=160):
    """An exception quoted inside a one-line message: 'Type: its message' on one line, cut to
    `limit` characters, or just 'Type' (an EOFError from an empty file has no message at all)."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
