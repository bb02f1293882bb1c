"""The demo pipeline: data -> AiO model -> thresholds -> CtF index -> Table 4 -> Figs. 3 and 4 -> ranked lists.

:func:`run_demo` is what ``ctfreid demo`` runs; a :class:`DemoConfig` holds every knob so that tests run it
end to end on a tiny configuration in seconds. The default configuration fits a fresh 2-core machine with
no data, no GPU and no pretrained weights: it generates the synthetic dataset (``ctfreid.data.synth``), trains
a small AiO model from scratch on the CPU, and writes into ``OUT``:

- ``data/`` (synthetic dataset), ``run/`` (the training run: ``model.pt``, ``log.jsonl``...), ``thresholds.json``
  (the accuracy target of ``ctfreid.eval.calibration``, or DTO with ``beta`` (Sec. 3.3), fitted on the run's
  validation identities: the 6 : 4 split of Sec. 4.2);
- ``gallery.ctf``: a :class:`ctfreid.search.index.CtFIndex` of the gallery with image paths, pids, camids and the
  model fingerprint in its metadata (``ctfreid search --index OUT/gallery.ctf --model OUT/run IMAGE``);
- ``results.json`` / ``results.md``: the Table-4 layout (float, each code length, CtF: Rank-1, Rank-5, mAP,
  ms per query, speed-up over the longest code), plus the beta and gallery-size sweeps;
- ``beta_sweep.png`` (Fig. 4), ``gallery_size.png`` (Fig. 3), ``ranked_lists.png``.

Gallery-size sweep (Fig. 3, Market-1501+500k in the paper): the full gallery plus a growing number of
*image-level* distractors: person crops of identities that appear neither in the queries nor in the
gallery, encoded by the model like every other image and labelled pid 0 (distractor). For the synthetic
data they are a second synthetic population (another seed, the same cameras' kind of rendering); for
``--data DIR`` they are the dataset's own ``bounding_box_train/`` images (identities disjoint from the
test identities by construction of the benchmarks).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctfreid.encoded import EncodedSet
from ctfreid.errors import CtfreidError, count
from ctfreid.eval.evaluate import DEFAULT_BETAS
from ctfreid.eval.report import method_key


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`. The defaults are the ``ctfreid demo`` run (6-8 min on 2 shared CPU cores)."""

    out: str = "ctfreid-demo"
    data: str | None = None  # Market-1501-layout dataset; None = generate the synthetic one into OUT/data
    model: str | None = None  # a trained run directory; None = train one into OUT/run
    weights: str | None = None  # backbone weights file (torchvision key names); None = from scratch
    # synthetic data
    ids: int = 400  # identities (half train, half test)
    cams: int = 4
    images_per_id: int = 8
    image_height: int = 128  # size the synthetic images are rendered at (the model may read them smaller)
    image_width: int = 64
    seed: int = 0
    # model and training (a CPU budget version of Sec. 4.2)
    backbone: str = "resnet18"
    lengths: tuple[int, ...] = (2048, 512, 128, 32)
    height: int = 64  # model input: a quarter of the paper's 256 x 128 per side, for the CPU budget
    width: int = 32
    epochs: int = 24
    warmup_epochs: int = 2
    milestones: tuple[int, ...] = (18,)
    lr: float = 1e-3
    p: int = 16
    k: int = 4
    padding: int = 4  # pad + random crop, in pixels of the model input
    frozen_stages: int = 0
    cache_stem: bool = False
    val_fraction: float = 0.4  # Sec. 4.2: train : val = 6 : 4, by identity; DTO fits on val
    device: str = "cpu"
    num_workers: int = 0
    threads: int = 0  # torch CPU threads; 0 = auto: 1 when other processes keep the CPU busy, else all
    # evaluation and report
    # thresholds: None = the accuracy target (within 0.5 mAP / Rank-1 points of the longest code on the
    # validation split, ctfreid.eval.calibration.default_fit: on the CUHK03 dev set DTO beta=2's accuracy,
    # 1.7-1.8x faster); a number = the paper's DTO with this beta (Eq. 8)
    beta: float | None = None
    betas: tuple[float, ...] = DEFAULT_BETAS
    distractor_ids: int = -1  # synthetic distractor identities for Fig. 3; -1: about 9x the gallery size
    gallery_sizes: int = 5  # points of the gallery-size sweep (geometric, gallery .. gallery + distractors)
    ranked_queries: int = 4
    top_k: int = 10
    timing_repeats: int = 3  # ms/query = the median of this many timed runs (the CPU may be shared)
    batch_size: int = 128
    progress: bool = True
    extra: dict = field(default_factory=dict)  # more TrainConfig settings, by name

    def __post_init__(self) -> None:
        self.lengths = tuple(int(x) for x in self.lengths)
        self.milestones = tuple(int(x) for x in self.milestones)
        self.betas = tuple(float(b) for b in self.betas)
        if self.gallery_sizes < 2:
            raise CtfreidError(f"gallery_sizes must be >= 2 points, got {self.gallery_sizes}")
        if self.ranked_queries < 1 or self.top_k < 1 or self.timing_repeats < 1:
            raise CtfreidError("ranked_queries, top_k and timing_repeats must be >= 1")
        if (self.beta is not None and self.beta <= 0) or any(b <= 0 for b in self.betas):
            raise CtfreidError(f"beta values must be > 0, got beta={self.beta}, betas={self.betas}")
        if not 0.0 < self.val_fraction < 1.0:
            raise CtfreidError(f"val_fraction must be in (0, 1): DTO fits on the validation split, got {self.val_fraction}")
        if self.p < 1 or self.k < 1 or self.epochs < 1:
            raise CtfreidError(f"p, k and epochs must be >= 1, got p={self.p}, k={self.k}, epochs={self.epochs}")
        if self.data is None:
            self._check_synthetic()

    def _check_synthetic(self) -> None:
        """Refuse settings the synthetic data or the training run cannot satisfy before rendering any image."""
        from ctfreid.data.synth import SynthConfig

        synth = SynthConfig(ids=self.ids, cams=self.cams, seed=self.seed)  # ids and cams in range
        if self.model is not None:
            return
        n_train = synth.num_train_ids
        n_fit = _fit_ids(n_train, self.val_fraction)
        if n_fit < self.p:
            raise CtfreidError(
                f"ids={self.ids} leaves {count(n_fit, 'identity', 'identities')} to train on "
                f"({n_train} training identities less the "
                f"validation split, val_fraction {self.val_fraction:g}); PK batches need p={self.p}: "
                f"use --ids {_min_ids(self.p, self.val_fraction, self.ids)} or more"
            )

    def check_inputs(self) -> None:
        """The given folders and files exist (``FileNotFoundError`` naming the one that does not): checked
        by :func:`run_demo` before any data is generated or any model trained."""
        from ctfreid.learn.run_dir import model_path

        if self.data is not None and not Path(self.data).is_dir():
            raise FileNotFoundError(f"--data {self.data}: no such folder (expected a dataset in Market-1501 layout)")
        if self.model is not None:
            model_path(Path(self.model))  # a run directory with model.pt / checkpoint.pt, or a model file
        if self.weights is not None and self.weights != "imagenet" and not Path(self.weights).is_file():
            raise FileNotFoundError(f"--weights {self.weights}: no such file (expected a torchvision state dict)")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")


def _fit_ids(n_train: int, val_fraction: float) -> int:
    """Identities left for training after ``split_train_val`` holds back the validation ones."""
    if n_train < 2:
        return 0  # the split needs two identities
    return n_train - min(max(int(round(val_fraction * n_train)), 1), n_train - 1)


def _min_ids(p: int, val_fraction: float, start: int) -> int:
    """The smallest number of synthetic identities whose training part still fills a PK batch."""
    from ctfreid.data.synth import SynthConfig

    for ids in range(max(start, 2), 10000):
        if _fit_ids(SynthConfig(ids=ids).num_train_ids, val_fraction) >= p:
            return ids
    return 9999


def _say(cfg: DemoConfig, message: str) -> None:
    if cfg.progress:
        from tqdm import tqdm

        tqdm.write(message)


def _synthetic_data(cfg: DemoConfig, root: Path, ids: int, seed: int, size: tuple[int, int] | None = None) -> bool:
    """Generate (or reuse, when generated with the same settings) a synthetic dataset in ``root``;
    ``size`` = (height, width) of the images, default the config's ``image_height`` x ``image_width``.
    Returns whether new data was generated."""
    from ctfreid.data.synth import generate_synthetic

    height, width = size or (cfg.image_height, cfg.image_width)
    settings = {"ids": ids, "cams": cfg.cams, "seed": seed, "images_per_id": cfg.images_per_id,
                "height": height, "width": width}
    stamp = root / "demo-settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        _say(cfg, f"  reusing {root} (same settings)")
        return False
    stamp.unlink(missing_ok=True)
    generate_synthetic(root, overwrite=True, progress=cfg.progress, **settings)
    from ctfreid._atomic import atomic_write

    with atomic_write(stamp, "w") as f:
        json.dump(settings, f)
    return True


def train_config(cfg: DemoConfig):
    """The :class:`ctfreid.learn.train.TrainConfig` of the demo's training run."""
    from ctfreid.learn.train import TrainConfig

    return TrainConfig(
        backbone=cfg.backbone, lengths=cfg.lengths, weights=cfg.weights, frozen_stages=cfg.frozen_stages,
        cache_stem=cfg.cache_stem, lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, milestones=cfg.milestones,
        epochs=cfg.epochs, p=cfg.p, k=cfg.k, height=cfg.height, width=cfg.width, padding=cfg.padding,
        val_fraction=cfg.val_fraction, seed=cfg.seed, device=cfg.device, num_workers=cfg.num_workers,
        **cfg.extra,
    )


def gallery_size_points(n_gallery: int, n_pool: int, points: int) -> list[int]:
    """Geometric gallery sizes from ``n_gallery`` to ``n_gallery + n_pool`` (distinct, ascending)."""
    top = n_gallery + n_pool
    sizes = np.unique(np.round(np.geomspace(n_gallery, top, points)).astype(int))
    return [int(s) for s in sizes]


def concat_sets(a: EncodedSet, b: EncodedSet) -> EncodedSet:
    """``a`` followed by ``b`` (same code lengths; features / paths / values kept when both have them)."""
    both = lambda x, y: None if x is None or y is None else np.concatenate([x, y])  # noqa: E731
    return EncodedSet(
        codes={L: np.concatenate([a.codes[L], b.codes[L]]) for L in a.codes},
        pids=np.concatenate([a.pids, b.pids]), camids=np.concatenate([a.camids, b.camids]),
        features=both(a.features, b.features), paths=both(a.paths, b.paths), values=both(a.values, b.values),
        later_values={L: np.concatenate([v, b.later_values[L]]) for L, v in a.later_values.items()
                      if L in b.later_values},
    )


def gallery_size_sweep(query: EncodedSet, gallery: EncodedSet, distractors: EncodedSet,
                       thresholds: dict[int, int], points: int = 5, seed: int = 0,
                       on_step: Callable[[int], None] | None = None, repeats: int = 1) -> list[dict]:
    """Fig. 3: ``evaluate_sets`` on the gallery plus growing random subsets of ``distractors`` (pid 0).

    Every size contains the whole gallery (so every query keeps its true matches) and the distractors of
    the smaller sizes (nested subsets, as a growing database). Returns one row per size:
    ``{"gallery_size", "num_distractors", "methods", ...}`` (the ``evaluate_sets`` dict).
    """
    from ctfreid.eval.evaluate import evaluate_sets

    if np.any(distractors.pids != 0):
        raise CtfreidError("distractors must all have pid 0")
    order = np.random.default_rng(seed).permutation(len(distractors))
    rows = []
    for size in gallery_size_points(len(gallery), len(distractors), points):
        extra = distractors.take(np.sort(order[: size - len(gallery)]))
        g = concat_sets(gallery, extra) if len(extra) else gallery
        res = evaluate_sets(query, g, thresholds, repeats=repeats)  # ms/query: the median of the repeats
        rows.append({"gallery_size": len(g), "num_distractors": len(extra), **res})
        if on_step:
            on_step(len(g))
    return rows


def weighted_stage1(wfit, query: EncodedSet, gallery: EncodedSet, results: dict, repeats: int = 1) -> dict | None:
    """The default weighted stage 1 (``wfit``: ``ctfreid.eval.calibration.default_weighted_fit``, the
    default for image queries) evaluated on ``query`` / ``gallery`` beside the Hamming row of ``results``
    (``evaluate_sets`` with thresholds): thresholds, weighting, CtF accuracy and what stage 1 keeps; None
    without a fit or values."""
    from ctfreid.eval.evaluate import evaluate_sets

    if wfit is None or "ctf" not in results["methods"] or query.values is None:
        return None
    row = evaluate_sets(query, gallery, wfit.thresholds, methods=["ctf"], repeats=repeats,
                        weighting=wfit.weighting)["methods"]["ctf"]
    L1 = str(min(gallery.lengths))
    return {"thresholds": {str(L): t for L, t in wfit.thresholds.items()}, "weights": wfit.weighting.to_dict(),
            **{k: row[k] for k in ("rank1", "rank5", "rank10", "mAP", "query_ms")},
            "stage1_keep_percent": 100 * row["candidates"][L1] / len(gallery),
            "hamming_stage1_keep_percent": 100 * results["methods"]["ctf"]["candidates"][L1] / len(gallery)}


def pick_queries(query: EncodedSet, gallery: EncodedSet, n: int) -> np.ndarray:
    """``n`` queries of distinct identities, evenly spread over the query list, each with a valid match."""
    valid = []
    for i in range(len(query)):
        same = gallery.pids == query.pids[i]
        if query.pids[i] > 0 and np.any(same & (gallery.camids != query.camids[i])):
            valid.append(i)
    seen, picked = set(), []
    for i in np.array(valid)[np.linspace(0, len(valid) - 1, min(len(valid), 4 * n)).astype(int)] if valid else []:
        if query.pids[i] not in seen:
            seen.add(int(query.pids[i]))
            picked.append(int(i))
    return np.array(picked[:n], dtype=np.int64)


def _distractor_records(cfg: DemoConfig, out: Path, data, n_gallery: int,
                        size: tuple[int, int]) -> tuple[list, str]:
    """Records (pid 0) of the distractor pool of the gallery-size sweep and a sentence saying what they are."""
    from ctfreid.data.datasets import load_market_layout

    if cfg.data is None:
        n_ids = cfg.distractor_ids
        if n_ids < 0:  # about 9x the gallery: sizes span one order of magnitude
            n_ids = max(2, int(np.ceil(9 * n_gallery / max(cfg.images_per_id, 1))))
        root = out / "distractors"
        # rendered at the model's input size: they are only encoded, never shown (and decode faster)
        _synthetic_data(cfg, root, n_ids, cfg.seed + 7919, (max(size[0], 32), max(size[1], 16)))
        ds = load_market_layout(root)
        records = [(p, 0, c) for p, pid, c in ds.train + ds.query + ds.gallery if pid > 0]
        what = (f"{len(records)} images of {n_ids} other synthetic people (seed {cfg.seed + 7919}), "
                "encoded by the model, pid 0")
    else:
        records = [(p, 0, c) for p, pid, c in data.train]
        what = f"the dataset's {len(records)} training images (identities disjoint from the test set), pid 0"
    return records, what


def choose_threads(requested: int = 0) -> int:
    """CPU threads for torch: ``requested`` if > 0, else the cores the 1-minute load average leaves free
    (at least 1). Why: torch's OpenMP threads wait for each other at every layer, so on cores that other
    processes keep busy two threads can run several times slower than one."""
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return cores
    return max(1, min(cores, cores - int(round(load))))


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo (see the module docstring); returns a summary with the paths of the outputs."""
    cfg.check_inputs()  # a missing --model or --data fails now, not after minutes of work
    import torch

    previous = torch.get_num_threads()
    threads = choose_threads(cfg.threads)
    torch.set_num_threads(threads)
    try:
        return _run_demo(cfg, threads)
    finally:
        torch.set_num_threads(previous)


def _run_demo(cfg: DemoConfig, threads: int) -> dict:
    from ctfreid.data.datasets import load_dataset, split_records
    from ctfreid.eval import report
    from ctfreid.eval.evaluate import beta_sweep, evaluate_sets, format_table
    from ctfreid.infer.encoder import load_encoder
    from ctfreid.infer.gallery import build_index
    from ctfreid.learn.train import train
    from ctfreid.eval.calibration import default_fit, default_weighted_fit, describe_fit, save_fit
    from ctfreid.search.thresholds import fit_dto, save_thresholds

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 7
    timings: dict[str, float] = {}

    def step(i: int, text: str) -> float:
        _say(cfg, f"[{i}/{steps}] {text}")
        return time.perf_counter()

    _say(cfg, f"ctfreid demo -> {out}/ (torch on {threads} CPU thread{'s' if threads > 1 else ''})")
    # 1. data
    t = step(1, "data")
    fresh_data = False
    if cfg.data is None:
        data_root = out / "data"
        fresh_data = _synthetic_data(cfg, data_root, cfg.ids, cfg.seed)
    else:
        data_root = Path(cfg.data)
    data = load_dataset(data_root)
    _say(cfg, data.summary())
    timings["data_s"] = time.perf_counter() - t

    # 2. model
    t = step(2, "model")
    if cfg.model is None:
        run_dir = out / "run"
        tc = train_config(cfg)
        _say(cfg, f"  training {tc.backbone} from {'scratch' if not tc.weights else tc.weights} at "
                  f"{tc.height}x{tc.width}, {tc.epochs} epochs, codes {list(tc.lengths)} -> {run_dir}")
        # a finished or interrupted run of the same settings is reused / continued, unless the data is new
        train(tc, data_root, run_dir, resume=not fresh_data, progress=cfg.progress)
    else:
        run_dir = Path(cfg.model)
        _say(cfg, f"  using the trained model in {run_dir}")
    encoder = load_encoder(run_dir, device=cfg.device)  # a run directory, or its ONNX export (--model x.onnx)
    info, fingerprint = encoder.info, encoder.fingerprint
    timings["train_s"] = time.perf_counter() - t


    def encode(records):
        return encoder.encode_records(records, batch_size=cfg.batch_size, progress=cfg.progress)

    # 3. encode + thresholds on the validation identities (Sec. 3.3 / 4.2)
    t = step(3, "encode query / gallery / validation images; thresholds on the validation split")
    query = encode(data.query)
    gallery = encode(data.gallery)
    val = encode(split_records("val", info, data_root))
    fits, fit, wfit = None, None, None
    if cfg.beta is not None:  # the paper's DTO
        fits = fit_dto(val.codes, val.pids, val.camids, beta=cfg.beta)
        thresholds = {L: f.threshold for L, f in fits.items()}
        source = f"DTO beta={cfg.beta:g} on {len(val)} validation images"
    else:  # the default: the accuracy target, planned for the gallery indexed below
        fit = default_fit(val, len(gallery))
        thresholds = dict(fit.thresholds)
        source = describe_fit(fit, len(val))
        wfit = default_weighted_fit(val, len(gallery))  # and its weighted stage 1, the default for image queries
    th_extra = {"source": f"{source} of {run_dir}", "num_images": len(val)}
    # the demo's own run too: 'ctfreid index build --model OUT/run' finds them there
    for path in [out / "thresholds.json"] + ([run_dir / "thresholds.json"] if cfg.model is None else []):
        if fits is not None:
            save_thresholds(path, fits, th_extra)
        else:
            save_fit(path, fit, extra=th_extra, weighted=wfit)
    _say(cfg, f"  thresholds ({source}): " + ", ".join(f"{L}-bit <= {t}" for L, t in thresholds.items()))
    if wfit is not None:
        _say(cfg, f"  for image queries, a weighted stage 1 ({wfit.weighting.bits}-bit weights): "
                  + ", ".join(f"{L}-bit <= {t}" for L, t in wfit.thresholds.items()))
    timings["encode_dto_s"] = time.perf_counter() - t

    # 4. index of the gallery
    t = step(4, "coarse-to-fine index of the gallery")
    index = build_index(gallery, thresholds, fingerprint, info, {"thresholds_source": source},
                        weighted=None if wfit is None else wfit.weighted_fit)
    index_path = out / "gallery.ctf"
    index.save(index_path)
    _say(cfg, f"  {index.ntotal} images, lengths {list(index.lengths)} -> {index_path}")
    timings["index_s"] = time.perf_counter() - t

    # 5. evaluate: Table 4 and Fig. 4
    t = step(5, "evaluate (Table 4) and the beta sweep (Fig. 4)")
    results = evaluate_sets(query, gallery, thresholds, repeats=cfg.timing_repeats)
    table = format_table(results)
    weighted = weighted_stage1(wfit, query, gallery, results, cfg.timing_repeats)
    if weighted is not None:
        _say(cfg, f"  CtF with the weighted stage 1 (the default for image queries, {wfit.weighting.bits}-bit "
                  f"weights): stage 1 keeps {weighted['stage1_keep_percent']:.1f} % of the gallery "
                  f"(Hamming, the table's CtF: {weighted['hamming_stage1_keep_percent']:.1f} %), CtF mAP "
                  f"{100 * weighted['mAP']:.1f} (Hamming: {100 * results['methods']['ctf']['mAP']:.1f})")
    sweep = beta_sweep(val, query, gallery, cfg.betas, repeats=cfg.timing_repeats)
    timings["evaluate_s"] = time.perf_counter() - t

    # 6. gallery size (Fig. 3)
    t = step(6, "gallery-size sweep with distractors (Fig. 3)")
    pool_records, pool_what = _distractor_records(cfg, out, data, len(gallery), (info["height"], info["width"]))
    pool = encode(pool_records)
    size_rows = gallery_size_sweep(query, gallery, pool, thresholds, cfg.gallery_sizes, cfg.seed,
                                   repeats=cfg.timing_repeats)
    timings["gallery_sweep_s"] = time.perf_counter() - t

    # 7. report
    t = step(7, "report: tables and plots")
    longest = max(gallery.lengths)
    ref = dict(results["methods"][method_key(longest)], label=f"{longest}-bit alone")
    paths = {
        "beta_sweep": report.plot_beta_sweep(sweep, out / "beta_sweep.png", reference=ref, beta=cfg.beta,
                                             title=f"DTO: CtF accuracy and speed against β ({len(query)} queries "
                                                   f"x {len(gallery)} gallery images)"),
        "gallery_size": report.plot_gallery_size(size_rows, out / "gallery_size.png",
                                                 note=f"distractors: {pool_what}"),
    }
    picked = pick_queries(query, gallery, cfg.ranked_queries)
    if len(picked):
        qcodes = {L: c[picked] for L, c in query.codes.items()}
        hits = index.search_hits(qcodes, index.ntotal)  # the whole ranking, with the stage of each item
        I, D, stages = hits.ids, hits.finest_distances, hits.stage_bits
        meta = index.metadata
        paths["ranked_lists"] = report.plot_ranked_lists(
            out / "ranked_lists.png", query.paths[picked], query.pids[picked], query.camids[picked],
            meta["paths"], np.asarray(meta["pids"]), np.asarray(meta["camids"]), I, D, k=cfg.top_k,
            title=f"CtF ranked lists from {index_path.name} (top-{cfg.top_k})", stages=stages)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    extra = {
        "config": {**asdict(cfg), "run_dir": str(run_dir), "data_root": str(data_root)},
        "model_fingerprint": fingerprint,
        **({"dto": {str(L): f.to_dict() for L, f in fits.items()}} if fits is not None else
           {"calibration": fit.to_dict()}),
        "beta_sweep": sweep,
        **({"weighted_stage1": weighted} if weighted is not None else {}),
        "gallery_size_sweep": size_rows,
        "distractors": pool_what,
        "timings": timings,
        "torch_threads": threads,
    }
    notes = [
        f"Model: {info['model_config'].get('backbone')} at {info['height']}x{info['width']}, "
        f"fingerprint {fingerprint}; thresholds: {source} (held-out training identities).",
        f"ms/query: median of {cfg.timing_repeats} timed runs, torch on {threads} thread(s), "
        "Hamming kernels single-threaded.",
        f"Gallery-size sweep (gallery_size.png): {len(gallery)} gallery images plus {pool_what}.",
    ]
    json_path, md_path = report.write_tables(
        results, out, "results", extra,
        title=f"ctfreid demo: {len(query)} queries x {len(gallery)} gallery images ({data.name})", notes=notes)
    paths.update(results_json=json_path, results_md=md_path, index=index_path, run_dir=run_dir,
                 thresholds=out / "thresholds.json")
    return {"results": results, "table": table, "query_paths": str(Path(data.root) / "query"),
            "paths": {k: str(v) for k, v in paths.items()}, "timings": timings,
            "beta_sweep": sweep, "gallery_size_sweep": size_rows, "thresholds": thresholds}
