"""
Command-line plumbing shared by the scripts: a config dataclass becomes argparse flags, a user's
mistake one line on stderr (exit code 2), and Ctrl-C or SIGTERM a request to stop at a safe point.
"""

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
    """--help shows each flag's default, and the script's docstring as it is written."""


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
    """Inside, a first Ctrl-C or SIGTERM (a scheduler's stop) only sets flag.set and says `notice`:
    the job stops at its next safe point. A second signal stops it at once."""
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
    """Hand glibc's free heap pages back, and give blocks of MALLOC[phase] or more their own
    mapping, returned when freed (large, short-lived arrays). Elsewhere than glibc: nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(-3, MALLOC[phase])  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        pass


def main_guard(main):
    """Run main(); a UserError ends it with one line and exit code 2, Ctrl-C with one line and
    exit code 130 (rank 0 speaks). Every process leaves its group: together when all end."""
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
