"""The ``ctfreid`` command line: one module per sub-command in ``ctfreid.cli`` (this package).

Each command module defines ``HELP`` (one line), ``DESCRIPTION`` (what it does, with an example),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that search-only
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ctfreid.errors import CtfreidError

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
    "serve": "ctfreid.cli.serve",
    "export": "ctfreid.cli.export",
}

_EPILOG = """examples:
  ctfreid demo                                   # synthetic data -> train -> thresholds -> CtF index -> report
  ctfreid evaluate --query q.npz --gallery g.npz --calibrate val.npz --beta 2
  ctfreid search --index gallery.ctf --model runs/aio query.jpg --k 10

run 'ctfreid COMMAND --help' for the options of a command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ctfreid`` parser with the options of ``command`` (its module is imported); every other command
    is a placeholder with its ``_HELP`` line, so that ``ctfreid --help`` imports no command module."""
    parser = _Parser(
        prog="ctfreid",
        description="Fast person re-identification with multi-length binary codes and coarse-to-fine search.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if name != command:
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


# Short help lines for the top-level listing (kept here so `ctfreid --help` imports nothing heavy); each equals
# its command module's HELP (tests/test_layout.py checks it).
_HELP = {
    "demo": "synthetic data -> train -> thresholds -> CtF index -> evaluate -> tables and plots",
    "synth": "generate a synthetic ReID dataset in Market-1501 layout",
    "train": "train an All-in-One (AiO) model that writes multi-length binary codes",
    "encode": "encode a split of a dataset into an .npz of codes and features",
    "calibrate": "fit coarse-to-fine thresholds on a validation set: DTO, or aimed at accuracy or a time budget",
    "evaluate": "CMC/mAP and query time of float, each code length and CtF from .npz files",
    "index": "build or extend a coarse-to-fine index from a folder of images",
    "search": "search an index with query images",
    "serve": "HTTP search service over a durable gallery (add, search, erase; a web page at /)",
    "export": "export a trained run to an ONNX encoder (onnxruntime, no torch) and check it",
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
    """Run ``ctfreid ARGS``; returns the exit code (0 success, 2 a user error printed as one line, 130
    interrupted). Any exception other than a user error (:class:`~ctfreid.errors.CtfreidError`, an
    ``OSError`` such as a missing or unwritable file, a missing optional dependency) is a bug and keeps
    its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    command = name or ""
    try:
        try:
            parser = build_parser(name if name in COMMANDS else None)
        except ImportError as e:  # a command whose options need an optional dependency
            return _missing_dependency(name, e)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv or args.command is None and ("-h" in argv or "--help" in argv) else 2
        command = " ".join(str(x) for x in (args.command, getattr(args, "action", None)) if x)  # e.g. "index build"
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("ctfreid: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        return _missing_dependency(command, e)
    except (CtfreidError, OSError) as e:  # OSError: FileNotFoundError, IsADirectoryError, ENOSPC...
        print(f"ctfreid {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in str(error):
        return f"{error.filename}: {error}"
    text = str(error) if not isinstance(error, OSError) or error.strerror is None else (
        f"{error.filename}: {error.strerror}" if error.filename else error.strerror)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
