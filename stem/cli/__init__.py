"""`python -m stem ...`: invert, compare, edit and evaluate videos from the command line.

Every bad input ends in one sentence on stderr and a non-zero exit (a traceback only with
--debug); a setting out of range is named by its flag. The modules form a tree: `options`
(generated from the settings dataclasses) and `common` (engine, output folder, progress) below
`invert`, `edit` and `evaluate`, which this module registers.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..errors import StemError
from .common import EXIT_ERROR, TqdmProgress, write_json
from .edit import add_edit_command
from .evaluate import add_evaluate_command
from .invert import add_invert_commands
from .options import cli_message, option_adder, whole_number

__all__ = ["EXIT_ERROR", "StemError", "build_parser", "cli_message", "main", "option_adder", "whole_number",
           "write_json"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stem", description="STEM inversion and text-guided editing of "
                                     "videos with Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_invert_commands(sub)
    add_edit_command(sub)
    add_evaluate_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    try:
        try:
            summary = args.run(args)
        finally:
            for progress in list(TqdmProgress.shown):  # an error starts its own line, not the end of a bar
                progress.close()
    except StemError as error:
        if debug:
            raise
        print(f"error: {cli_message(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug or an environment failure: one line unless --debug
        if debug:
            raise
        hint = ""
        if "out of memory" in str(error).lower():
            hint = " Try fewer --frames, a smaller --size, --chunk-size or --offload."
        print(f"error: {type(error).__name__}: {error}.{hint} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
