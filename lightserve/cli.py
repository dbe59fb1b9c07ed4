"""The `lightserve` command (installed with the package).

    lightserve serve [flags]   start a server: the same as `python -m lightserve.api_server`
    lightserve bench [flags]   the serving benchmark: the same as `python -m lightserve.benchmark`

Each subcommand's module is imported only when it runs: a server's child processes import the
main module again when they start (multiprocessing spawn), and must not pull in what they do not
use.
"""

from __future__ import annotations

import sys
from typing import Optional

USAGE = "usage: lightserve {serve,bench} [flags]   (`lightserve serve --help`, `lightserve bench --help`)"


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("serve", "bench"):
        print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from lightserve.launcher import main as serve

        serve(rest)
        return 0
    from lightserve.benchmark.cli import main as bench

    return bench(rest)
