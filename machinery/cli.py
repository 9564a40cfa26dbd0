"""The scripts' command lines: a config dataclass's flags, a user's mistake as one line (exit
code 2), Ctrl-C or SIGTERM as a request to stop at a safe point."""

import argparse
import ctypes
import dataclasses
import os
import signal
import sys
from contextlib import contextmanager
from types import SimpleNamespace


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, never as a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, once the work is saved: main_guard prints the message, exit code 130."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block + message, folded into one line
        raise UserError(f"{message} (see --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the script's docstring as written."""


def flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls, description, argv=None):
    """Parse argv into an instance of the dataclass `cls`; a bool field x gives --x and --no_x."""
    parser = _Parser(description=description, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action="store_true", default=f.default,
                                help=f.metadata["help"])
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                help=f"turn --{f.name} off")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default,
                                help=f.metadata["help"])
    args = parser.parse_args(argv)
    return cls(**vars(args)), parser


@contextmanager
def interruptible(notice):
    """A first Ctrl-C or SIGTERM sets flag.set (stop at a safe point); a second stops at once."""
    flag = SimpleNamespace(set=False)

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handler(signum, frame):
        flag.set = True
        restore()
        if is_main_process():
            print(f"\n{notice}", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        restore()


def is_main_process():
    """Rank 0 of a torchrun job, or a single process: the one that speaks."""
    return os.environ.get("RANK", "0") == "0"


MALLOC = {"transient": 1 << 20, "training": 32 << 20}  # glibc's mmap threshold, by phase


def malloc_for(phase):
    """glibc: free heap pages handed back; blocks of MALLOC[phase] or more mapped apart, returned
    when freed (large, short-lived arrays). Elsewhere: nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(-3, MALLOC[phase])  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        pass


def main_guard(main):
    """main(); a UserError ends in one line and exit code 2, Ctrl-C in one line and 130."""
    together = False
    try:
        main()
        together = True
    except UserError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        together = isinstance(e, Interrupted)
        if is_main_process():
            print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        from machinery import distributed  # here: distributed.py imports this module
        distributed.teardown(together)
