"""
Command-line plumbing shared by the scripts: a config dataclass becomes argparse flags (help text
from each field's metadata), and a user's mistake becomes one line on stderr and exit code 2.
"""

import argparse
import dataclasses
import sys


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, never as a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block + message, folded into one line
        raise UserError(f"{message} (see --help)")


def flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls, description, argv=None):
    """Parse argv into an instance of the dataclass `cls`; a bool field x gives --x and --no_x."""
    parser = _Parser(description=description,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def main_guard(main):
    """Run main(); a UserError ends the program with one line and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
