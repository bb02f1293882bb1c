"""``ctfreid train``: train an All-in-One model (Sec. 3.2, recipe of Sec. 4.2); one flag per ``TrainConfig`` field."""

from __future__ import annotations

import argparse
import dataclasses
import typing

HELP = "train an All-in-One (AiO) model that writes multi-length binary codes"
DESCRIPTION = """Train the All-in-One model of the paper (backbone -> code pyramid 2048/512/128/32 with
self-distillation, Eq. 5) on the bounding_box_train/ images of a Market-1501-layout folder. The defaults
are the paper's recipe (Sec. 4.2: ResNet-50, Adam lr 3.5e-4 with a 10-epoch warm-up, x0.1 at 40 and 70,
120 epochs, 16 x 4 PK batches, 256 x 128). RUN_DIR receives config.json, split.json, log.jsonl (one JSON
line per epoch), checkpoint.pt after every epoch and model.pt at the end. Running the same command again
continues from the last completed epoch; a finished run is left as it is (also when its checkpoint.pt was
deleted). --no-resume starts again and keeps nothing stale: the old log and checkpoint are removed, the
old model.pt and thresholds.json are kept aside as model.previous.pt and thresholds.previous.json.

Fast CPU recipe: freeze the first backbone stages and cache their outputs once (--frozen-stages N
--cache-stem); only the rest is trained, with flip, translation and erasing applied to the cached maps.

examples:
  ctfreid train --data market1501/ --out runs/aio-r50                       # the paper's recipe (GPU)
  ctfreid train --data cuhk03np/ --out runs/mnv2 --backbone mobilenet_v2 \\
      --weights mobilenet_v2_imagenet.pth --frozen-stages 3 --cache-stem --val-fraction 0.4 \\
      --epochs 60 --warmup-epochs 5 --milestones 30 50"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctfreid.learn.train import (  # torch is imported only by run() callers
        TrainConfig,
        config_field_types,
    )

    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder in Market-1501 layout")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created; resumed if it holds a run)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start again even if RUN_DIR holds a run (its model.pt and thresholds.json are "
                             "kept as model.previous.pt and thresholds.previous.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    hints = config_field_types()
    group = parser.add_argument_group("training settings (defaults: the paper's recipe)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        args = typing.get_args(kind)
        shown = "" if default is None else f" (default: {_show(default)})"
        kw: dict = {"help": f.metadata["help"] + shown, "default": default}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(type=int, nargs="*", metavar="N")
        else:
            base = next((a for a in args if a is not type(None)), kind) if args else kind
            kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f.name), dest=f.name, **kw)


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def run(args: argparse.Namespace) -> int:
    import json

    from ctfreid.learn.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**values)
    summary = train(config, args.data, args.out, resume=args.resume, progress=not args.quiet)
    last = summary.get("last")
    if summary["resumed_from_epoch"] >= config.epochs:
        print(f"{args.out}: already trained for {summary['resumed_from_epoch']} epochs; model in {summary['model']}")
    else:
        loss = f", final loss {last['total']:.4g}" if last else ""
        print(f"trained {config.epochs} epochs ({summary['images_per_s']:.0f} img/s{loss}); model in {summary['model']}")
    if not args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0
