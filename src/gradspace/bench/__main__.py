"""``python -m gradspace.bench {update,step,memory,distributed,adarank,gpu,...}``: side-by-side benchmarks, markdown
tables."""

from __future__ import annotations

import argparse

import torch

from . import adarank_sweep, budget, gpu, memory, plan_accuracy, sharded_updates, step, svd, update
from .timing import machine

#: the subcommands, in the order ``--help`` lists them: each module's ``register(subparsers)`` adds its parser and
#: sets ``main`` (parsed flags -> the text to print). A new benchmark is a module with ``register`` and a line here.
BENCHES = (update, step, svd, budget, plan_accuracy, sharded_updates, adarank_sweep, memory, gpu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradspace.bench", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="bench", required=True)
    for bench in BENCHES:
        bench.register(sub)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    print(args.main(args))


if __name__ == "__main__":
    main()
