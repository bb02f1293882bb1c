"""The ``ctfreid`` command line: one module per sub-command in ``ctfreid.cli`` (this package).

Each command module defines ``HELP`` (one line), ``DESCRIPTION`` (what it does, with an example),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that search-only
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; the order is the order of ``ctfreid --help``.
COMMANDS: dict[str, str] = {
    "demo": "ctfreid.cli.demo",
    "synth": "ctfreid.cli.synth",
    "train": "ctfreid.cli.train",
    "encode": "ctfreid.cli.encode",
    "calibrate": "ctfreid.cli.calibrate",
    "evaluate": "ctfreid.cli.evaluate",
    "index": "ctfreid.cli.index",
    "search": "ctfreid.cli.search",
}

_EPILOG = """examples:
  ctfreid demo                                   # synthetic data -> train -> DTO -> CtF index -> report
  ctfreid evaluate --query q.npz --gallery g.npz --calibrate val.npz --beta 2
  ctfreid search --index gallery.ctf --model runs/aio query.jpg --k 10

run 'ctfreid COMMAND --help' for the options of a command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctfreid",
        description="Fast person re-identification with multi-length binary codes and coarse-to-fine search.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is not None and name != only:
            # Register a placeholder so --help lists every command without importing them all.
            sub.add_parser(name, help=_HELP.get(name, ""))
            continue
        module = _load(name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# Short help lines for the top-level listing (kept here so `ctfreid --help` imports nothing heavy).
_HELP = {
    "demo": "synthetic data -> train -> DTO -> CtF index -> evaluate -> tables and plots",
    "synth": "generate a synthetic ReID dataset in Market-1501 layout",
    "train": "train an All-in-One (AiO) model that writes multi-length binary codes",
    "encode": "encode a split of a dataset into an .npz of codes and features",
    "calibrate": "fit DTO thresholds on an encoded validation set",
    "evaluate": "CMC/mAP and query time of float, each code length and CtF from .npz files",
    "index": "build or extend a coarse-to-fine index from a folder of images",
    "search": "search an index with query images",
}


# Optional dependencies -> the extra that installs them (a missing one is a one-line hint, not a traceback).
_EXTRAS = {"torch": "train", "torchvision": "train", "PIL": "train", "matplotlib": "train", "faiss": "bench"}


def _missing_dependency(command: str | None, error: ImportError) -> int:
    top = (error.name or "").split(".")[0]
    if top not in _EXTRAS:
        raise error
    where = f"ctfreid {command}" if command else "ctfreid"
    print(f"{where}: error: this command needs {top}, which is not installed: "
          f'pip install "ctfreid[{_EXTRAS[top]}]"', file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(only=name if name in COMMANDS else "")
    except ImportError as e:  # a command whose options need an optional dependency
        return _missing_dependency(name, e)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv or args.command is None and ("-h" in argv or "--help" in argv) else 2
    command = " ".join(str(x) for x in (args.command, getattr(args, "action", None)) if x)  # e.g. "index build"
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("ctfreid: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        return _missing_dependency(command, e)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, FileExistsError, IsADirectoryError...
        print(f"ctfreid {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
