"""``sparsepo-lite``: the command line. One module per command, each a thin parser over a library
function:

    sparsepo-lite train CONFIG.yaml [--field value ...]          (train --help: every field, by group)
    sparsepo-lite precompute-ref CONFIG.yaml --out DIR [--top-k K] [--store hidden] [--field value ...]
    sparsepo-lite verify-ref DIR [--against-live N --policy RUN]
    sparsepo-lite eval-sentiment RUN_DIR --data EVAL.jsonl       (sentiment quickstart report)
    sparsepo-lite inspect-masks RUN_DIR --data FILE [--out masks.html]
    sparsepo-lite plan --model NAME_OR_CONFIG [--seq-len T] [--gpu-mem 24GB] [--loss sparsepo]

Several processes: ``accelerate launch --multi_gpu --num_processes N -m sparsepo_lite.cli train ...``
(on the CPU with ``use_cpu: true``).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from ..errors import TrainingError
from . import eval_sentiment, inspect_masks, plan, precompute_ref, train, verify_ref

#: The commands, in the order ``--help`` lists them.
COMMANDS = {
    "train": train,
    "precompute-ref": precompute_ref,
    "verify-ref": verify_ref,
    "eval-sentiment": eval_sentiment,
    "inspect-masks": inspect_masks,
    "plan": plan,
}
#: Commands that pass unknown ``--field value`` arguments on as config overrides.
TAKES_OVERRIDES = ("train", "precompute-ref")

#: Errors that describe bad input or a failed run (data rows, configs, caches, files, the run's
#: outcome): reported in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, TrainingError)


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="sparsepo-lite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"sparsepo-lite {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if args.command not in TAKES_OVERRIDES and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        COMMANDS[args.command].run(args, rest)
    except USER_ERRORS as exc:
        # A one-line message naming the row, field or file; SPARSEPO_LITE_DEBUG=1 keeps the traceback.
        if os.environ.get("SPARSEPO_LITE_DEBUG"):
            raise
        raise SystemExit(f"sparsepo-lite {args.command}: {exc}") from None
