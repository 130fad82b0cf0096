"""`lowbit` command line: one dispatcher, one module per sub-command in lowbit/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LowbitError
from .kernels.errors import KernelConfigError

COMMANDS = ("generate", "quantize", "eval", "serve", "chat", "bench", "env")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs with AWQ and serve them fast.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lowbit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lowbit.commands.{name}":
                raise
            continue  # a command still being built
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        _configure_process(args)
        if _worker_node(args):
            from .commands.engine_flags import worker_engine_args
            from .engine.tp.node import run_node

            return run_node(worker_engine_args(args))
        return int(args.func(args) or 0)
    except (LowbitError, KernelConfigError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _worker_node(args: argparse.Namespace) -> bool:
    """A machine other than node 0 of a multi-node tensor-parallel run: it only hosts ranks."""
    if not hasattr(args, "node_rank"):
        return False
    from .engine.tp.node import effective_node_rank

    return effective_node_rank(args.node_rank, args.nnodes) > 0


def _configure_process(args: argparse.Namespace) -> None:
    """Process-wide settings belong to the entry point that owns the process, never to the library
    (an application embedding an engine keeps its own): --threads sets torch's thread count here,
    before the command builds an engine."""
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
