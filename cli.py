"""The command line of every script: the error type a user's mistake raises, the parser that prints it as one line
with exit status 2, the checked number ranges of the options, and the check that an output folder can be written.
"""
import argparse
import math
import os
import re
import sys


class UserError(Exception):
    """A mistake in the user's input: the scripts print its one-line message and exit with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and every option's default (unless its help names it)."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every script's parser: --help shows defaults, and a bad option is one line `error: ...`, exit status 2 (no
    usage block, no traceback). A Number's complaint is given as `error: --flag VALUE: must be ... (default D)`."""

    def __init__(self, defaults=None, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)
        self.defaults = defaults  # where the defaults live when the options' own are SUPPRESS (train.py's Settings)

    def parse_known_args(self, args=None, namespace=None):
        self.argv = list(sys.argv[1:] if args is None else args)  # for error's hint
        return super().parse_known_args(args, namespace)

    def negative_after(self, flag: str) -> bool:
        """Whether flag was typed before a negative number such as -1,2, which argparse takes for a flag."""
        argv = getattr(self, "argv", [])
        return any(a == flag and re.match(r"-\.?\d", b) for a, b in zip(argv, argv[1:]))

    def error(self, message):
        flag, sep, rest = message.removeprefix("argument ").partition(": ")
        action = self._option_string_actions.get(flag.split("/")[0])
        if sep and action and rest == "expected one argument" and self.negative_after(flag):
            message = f"{flag}: {rest} (a value that starts with '-' is written {flag}=VALUE)"
        elif sep and action and isinstance(action.type, Number):  # Numbers is a Number too
            default = action.default if action.default is not argparse.SUPPRESS else getattr(self.defaults, action.dest,
                                                                                             None)
            default = f" (default {default})" if default is not None else ""
            message = f"{flag} {rest}{default}"
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


class Number:
    """An argparse type for a number with its valid range, checked where the arguments are parsed, before any work:
    Number(int, lo=1) is a positive integer, Number(float, 0, 1) a probability, Number(float, 0, 1, hi_open=True) an
    EMA decay. NaN and infinities are refused. `what` names the range in the message."""

    def __init__(self, kind=float, lo=None, hi=None, lo_open=False, hi_open=False, multiple=1, what=None):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.lo_open, self.hi_open, self.multiple = lo_open, hi_open, multiple
        self.what = what or self.describe()
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{noun} {'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else f"a finite {noun[2:]}"

    def ok(self, v) -> bool:
        if not math.isfinite(v) or (self.multiple > 1 and v % self.multiple):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not {'an integer' if self.kind is int else 'a number'}; "
                                             f"must be {self.what}")
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"{text}: must be {self.what}")
        return v


class Numbers(Number):
    """A comma-separated list of Numbers, e.g. guidance weights 0,0.5,1 or seeds 0,1,2."""

    def __call__(self, text: str):
        items = [t.strip() for t in text.split(",")]
        bad = next((t for t in items if not self.parses(t)), None)
        if bad is not None or not text.strip():
            raise argparse.ArgumentTypeError(f"{text}: each value must be {self.what} ({bad!r} is not); give a "
                                             f"comma-separated list such as 0,1,2")
        return [self.kind(t) for t in items]

    def parses(self, t: str) -> bool:
        try:
            return self.ok(self.kind(t))
        except ValueError:
            return False


# the ranges most options need
POSITIVE_INT = Number(int, lo=1, what="a positive integer")
COUNT = Number(int, lo=0, what="an integer >= 0")
SWITCH = Number(int, 0, 1, what="0 or 1")
POSITIVE = Number(float, lo=0, lo_open=True, what="a number > 0")
PROBABILITY = Number(float, 0, 1, what="a probability in [0, 1]")
IMAGE_SIZE = Number(int, lo=4, multiple=4, what="a multiple of 4 (the network halves it twice), such as 64")
FRACTIONS_OF_T = Numbers(float, 0, 1, what="a fraction of T in [0, 1]")  # the noise levels of a guidance interval


def run_cli(fn, args) -> None:
    """Run a script's body; a UserError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def ensure_writable(folder: str, flag: str) -> None:
    """Create folder if needed and prove a file can be written there, before any work is done."""
    probe = os.path.join(folder, f".write_test.{os.getpid()}")  # per process: torchrun ranks probe at once
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{folder}: output folder cannot be written ({e.strerror}); pass another {flag}")
