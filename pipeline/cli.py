"""What every command shares: absl flags defined when the command runs (not at import, so one process
can import several commands' libraries), and errors as one line on stderr with exit status 2."""
from __future__ import annotations

import sys

from absl import app, flags


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def run(prog: str, main, define_flags, beam_args: bool = False) -> None:
    """app.run(main) with prog's flags; beam_args=True leaves the flags absl does not know (--runner,
    --project, ...) in main's argv for Beam, as pipeline.build does."""
    define_flags()

    def parse(argv):
        try:
            return flags.FLAGS(argv, known_only=beam_args)
        except flags.Error as e:  # a bad or unknown flag: one line, exit 2, like every other error
            sys.exit(fail(prog, str(e)))

    app.run(main, flags_parser=parse)
