"""The console script's entry point (pyproject [project.scripts]).

`graphopt.cli` imports onnx, onnxruntime, numpy and rich, which takes a second or more; a Ctrl-C meanwhile
raised KeyboardInterrupt before `cli.main` (and its handler) existed, so the user saw a traceback. This module
imports nothing heavy itself (graphopt/__init__ is lazy), so it can catch that and exit 130 like `cli.main` does.
"""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def main() -> int:
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:  # during the imports above, or argument parsing before cli.main's own handler
        sys.stderr.write("graphopt: interrupted; nothing was written\n")
        return INTERRUPTED
    except BrokenPipeError:  # `graphopt passes | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a program killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
