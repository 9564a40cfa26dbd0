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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what schedulers send to stop a job


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, never as a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, once the program has saved its work: main_guard prints the message, exit
    code 130."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block + message, folded into one line
        raise UserError(f"{message} (see --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the script's docstring as it is written (argparse
    would reflow its paragraphs and command lines into one)."""


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
    """Inside, a first Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) only sets flag.set, says
    `notice` on stderr and restores the previous handlers: the job stops at its next safe point,
    and a second signal stops it at once."""
    flag = SimpleNamespace(set=False)

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handler(signum, frame):
        flag.set = True
        restore()
        if is_main_process():
            print(f"\n{notice}", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        restore()


def is_main_process():
    """Rank 0 of a torchrun job, or a single process: the one that speaks."""
    return os.environ.get("RANK", "0") == "0"


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: blocks this big or more get their own mapping
MALLOC = {"transient": 1 << 20, "training": 32 << 20}


def malloc_for(phase):
    """Tune glibc's malloc for a phase of the run, and hand the heap's free pages back to the
    system. "transient" (preparing a corpus, evaluating): large short-lived arrays of varying
    shapes, which glibc would keep resident once freed, so blocks of 1 MB or more get a mapping
    of their own, returned when freed. "training": blocks under 32 MB reused from the heap, and
    trimmed every train.TRIM_EVERY steps, since a text's candidate batches differ in shape and
    leave free pages behind. Elsewhere than glibc, nothing is done."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC[phase])
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        pass


def main_guard(main):
    """Run main(); a UserError ends the program with one line and exit code 2, Ctrl-C (or SIGTERM)
    with one line and exit code 130. With several processes only rank 0 says it, and however main
    ends, each process leaves their group before it exits: all at once when all end together
    (main returned, or all were interrupted at the same step)."""
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
