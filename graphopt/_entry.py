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
    except ImportError as exc:  # onnxruntime turns a Ctrl-C during its own import into ImportError from it
        if not _caused_by_interrupt(exc):
            raise
        sys.stderr.write("graphopt: interrupted; nothing was written\n")
        return INTERRUPTED
    except BrokenPipeError:  # `graphopt passes | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a program killed by SIGPIPE


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
