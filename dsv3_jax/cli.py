"""Command-line conventions of the entry points (train.py, dsv3_jax.sample, sharding.aot,
sharding.plan): `--help` prints usage and exits 0; bad input is one line on stderr,
`PROG: error: …`, with exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

_HELP = {"--help": True, "-h": True, "-?": True, "--helpshort": True, "--helpfull": False}


def fail(prog: str, message: str, status: int = 2):
    """Prints `PROG: error: MESSAGE` to stderr and exits with `status`."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def flags_parser(prog: str, describe: Callable[[Exception, list[str]], str] | None = None,
                 check: Callable[[list[str]], None] | None = None):
    """An `app.run(flags_parser=…)` that keeps the conventions above.

    absl's own --help exits with status 1, and a bad flag value escapes as a traceback from
    inside the parser; here help exits 0 and any parse failure is one line (`describe(error,
    argv)` when given, else the error's first line). `check(argv)`, when given, runs before
    parsing (after --help); a ValueError from it is the one line.
    """
    def parse(argv: list[str]) -> list[str]:
        for arg in argv[1:]:
            if arg == "--":
                break
            if arg in _HELP:
                app.usage(shorthelp=_HELP[arg], writeto_stdout=True, exitcode=0)
        if check is not None:
            try:
                check(argv)
            except ValueError as e:
                fail(prog, first_line(e))
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # absl and config_flags raise many exception types
            fail(prog, describe(e, argv) if describe else first_line(e))

    return parse
