"""Benchmark: the training input pipeline vs the training step it feeds (issue 5).

Sample records made by odapi's own stages (sample export -> ingest -> prepare, default shard
sizing: one train shard at this size) feed `task.build_inputs(params.task.train_data)`, the
dataset training iterates, with params from `tfvision.build_params` for the sample
RetinaNet-mobile config at batch 8. One process; the variants alternate over --rounds rounds
because the machine may be busy: wall rates are best of rounds, CPU costs are medians (CPU
ms per image barely depends on how much of the machine other jobs take).

- input (decode + augment + batch, no model): TF-Vision's DataConfig defaults, the model
  YAML's `train_data` (tuned), each candidate alone on top of the defaults, two records
  layouts the pipeline controls (4 train shards; `images.max_side`), and `cache: true` once
  (its memory, and whether augmentation still varies: TF-Vision caches after the parser);
- training: `task.train_step` in a tf.function on batches held in memory (what the model
  consumes) and fed live by the tuned pipeline (fed/held near 1: the input never starves it).

    .venv/bin/python bench/input_pipeline.py [--images 400] [--max-side 480] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

SAMPLE_MODEL = (Path(__file__).resolve().parents[1]
                / "include/configs/models/retinanet_mobile_sample.yaml")
BATCH = 8
SMALL_SIDE = 256  # images.max_side of the downsized records: 2x the model's 128 px input
# DataConfig fields that change how the input is read, not which examples the model sees
THROUGHPUT_KEYS = ("cycle_length", "block_length", "deterministic", "prefetch_buffer_size",
                   "cache", "autotune_algorithm", "sharding")


def _records(root: Path, count: int, max_side: int) -> dict[str, Path]:
    """Records folders as the pipeline makes them: default shard sizing, the same images in
    4 train shards, and the images downsized by the images stage (`images.max_side`)."""
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.prepare import prepare
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.data.shard import write_shards

    ratios = {"train": 0.8, "val": 0.2}
    generate(root / "export", count=count, seed=0, max_side=max_side)
    ingest([str(root / "export")], root / "ingest")
    manifest = root / "ingest" / "manifest.jsonl"
    prepared = prepare(manifest, root / "prepared", ratios=ratios)
    write_shards(root / "prepared" / "verify" / "manifest.jsonl", prepared["label_map"],
                 root / "records-4", ratios, {"train": 4, "val": 1})
    small = prepare(manifest, root / "small", ratios=ratios, max_side=SMALL_SIDE)
    return {"default": Path(prepared["data"]), "4 shards": root / "records-4",
            "small": Path(small["data"])}


@dataclass
class Variant:
    """Train-data settings to measure: `overrides` apply on top of TF-Vision's defaults
    unless `from_yaml`; `options` are tf.data options that DataConfig cannot express."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    records: str = "default"
    from_yaml: bool = False
    options: Callable[[], Any] | None = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)


def _private_threadpool() -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = os.cpu_count() or 1
    return options


class Inputs:
    """Builds a variant's training dataset exactly as training does."""

    def __init__(self, records: dict[str, Path]) -> None:
        from official.core import task_factory

        from odapi_operators.core.model import tfvision

        self.params = {name: tfvision.build_params(SAMPLE_MODEL, path, 1000, BATCH)
                       for name, path in records.items()}
        self.task = task_factory.get_task(self.params["default"].task)
        stock = type(self.params["default"].task.train_data)()
        self.defaults = {key: getattr(stock, key) for key in THROUGHPUT_KEYS}

    def train_data(self, variant: Variant):
        data = self.params[variant.records].task.train_data.replace()
        if not variant.from_yaml:
            data.override(self.defaults, is_strict=True)
        data.override(variant.overrides, is_strict=True)
        return data

    def dataset(self, variant: Variant):
        dataset = self.task.build_inputs(self.train_data(variant))
        return dataset.with_options(variant.options()) if variant.options else dataset


def _timed(batches: Iterator, count: int) -> tuple[float, float]:
    """(images/s, CPU ms per image of this process) over the next `count` batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    images = count * BATCH
    return images / (time.perf_counter() - wall), (time.process_time() - cpu) * 1e3 / images


def _measure_input(inputs: Inputs, variant: Variant, warmup: int, count: int) -> None:
    """One round: build, time to the first batch, then the rate after `warmup` batches."""
    start = time.perf_counter()
    batches = iter(inputs.dataset(variant))
    next(batches)
    variant.first.append(time.perf_counter() - start)
    for _ in range(warmup):
        next(batches)
    wall, cpu = _timed(batches, count)
    variant.wall.append(wall)
    variant.cpu.append(cpu)


def _cache_check(inputs: Inputs, train_images: int) -> dict[str, float]:
    """`cache: true`: memory, steady rate once cached, distinct images in epochs 1 and 3.

    Run it before the other variants: their freed memory would hide its RSS growth."""
    import tensorflow as tf

    rss = psutil.Process().memory_info().rss
    dataset = inputs.dataset(Variant("cache", {"cache": True}))
    batches, epoch = iter(dataset), -(-train_images // BATCH)

    def checksums() -> list[float]:
        return [round(float(s), 1) for image, _ in itertools.islice(batches, epoch)
                for s in tf.reduce_sum(image, axis=[1, 2, 3]).numpy()]

    seen = checksums()
    rate, cpu_ms = _timed(batches, epoch)
    seen += checksums()
    element = sum(s.shape.num_elements() * s.dtype.size
                  for s in tf.nest.flatten(dataset.element_spec)) / BATCH
    return {"rate": rate, "cpu_ms": cpu_ms,
            "rss_mb": (psutil.Process().memory_info().rss - rss) / 1e6,
            "cache_mb": element * train_images / 1e6, "seen": len(seen),
            "distinct": len(set(seen))}


def _train_step(inputs: Inputs) -> Callable:
    import tensorflow as tf

    params, task = inputs.params["default"], inputs.task
    model = task.build_model()
    optimizer = task.create_optimizer(params.trainer.optimizer_config, params.runtime)
    metrics = task.build_metrics(training=True)
    return tf.function(lambda batch: task.train_step(batch, model, optimizer, metrics))


def _train_rate(step: Callable, batches: Iterator, warmup: int,
                steps: int) -> tuple[float, float]:
    """(training images/s, CPU ms per image) over `steps` steps after `warmup` steps."""
    for _ in range(warmup):
        step(next(batches))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logs = step(next(batches))
    float(logs["loss"])  # waits for the last step
    images = steps * BATCH
    return images / (time.perf_counter() - wall), (time.process_time() - cpu) * 1e3 / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--max-side", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="timed input batches")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps")
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="odapi-bench-input-") as name:
        records = _records(Path(name), args.images, args.max_side)
        from odapi_operators.core.model import tfvision

        tfvision.setup_tensorflow()
        inputs = Inputs(records)
        train = json.loads((records["default"] / "summary.json").read_text())["splits"]["train"]
        print(f"{os.cpu_count()} cores; {train['images']} train images (max side "
              f"{args.max_side}, {train['bytes'] / 1e6:.0f} MB in {train['shards']} shard), "
              f"batch {BATCH}, {args.rounds} rounds; data ready in "
              f"{time.perf_counter() - started:.0f} s")
        yaml_data = inputs.train_data(Variant("", from_yaml=True))
        print("TF-Vision defaults: " + ", ".join(f"{k}={v}" for k, v in inputs.defaults.items()))
        changed = {k: getattr(yaml_data, k) for k in THROUGHPUT_KEYS
                   if getattr(yaml_data, k) != inputs.defaults[k]}
        print(f"model YAML changes: {changed or 'none (tuned = defaults: their spread is noise)'}")
        default = Variant("TF-Vision defaults")
        tuned = Variant("model YAML (tuned)", from_yaml=True)
        small = Variant(f"images.max_side {SMALL_SIDE} +", records="small")
        variants = [
            default, tuned,
            Variant("deterministic: false", {"deterministic": False}),
            Variant("autotune_algorithm: MAX_PARALLELISM",
                    {"autotune_algorithm": "MAX_PARALLELISM"}),
            Variant("private threadpool *", options=_private_threadpool),
            Variant("4 train shards (cycle_length auto) +", records="4 shards"),
            small,
        ]
        next(iter(inputs.dataset(default)))  # one-time TF start-up costs, outside every round
        cache = _cache_check(inputs, train["images"])
        for round_ in range(args.rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                _measure_input(inputs, variant, 8, args.batches)

        step = _train_step(inputs)
        held = list(itertools.islice(iter(inputs.dataset(tuned)), 4))
        feeds = {"batches held in memory": itertools.cycle(held),
                 "fed by the tuned pipeline": iter(inputs.dataset(tuned))}
        trained: dict[str, list[tuple[float, float]]] = {name: [] for name in feeds}
        step(held[0])  # traces once, outside every measurement
        for round_ in range(args.rounds):
            for name in list(feeds) if round_ % 2 == 0 else list(feeds)[::-1]:
                trained[name].append(_train_rate(step, feeds[name], 2, args.steps))

    best = {v.name: max(v.wall) for v in variants}
    print(f"\n{'input variant':38} {'images/s':>8} {'vs dflt':>7} {'rounds':>9} "
          f"{'CPU ms/img':>10} {'1st batch s':>11}")
    for v in variants:
        print(f"{v.name:38} {best[v.name]:8.0f} {best[v.name] / best[default.name]:6.2f}x "
              f"{'/'.join(f'{w:.0f}' for w in v.wall):>9} {statistics.median(v.cpu):10.1f} "
              f"{min(v.first):11.1f}")
    print(f"{'cache: true (once cached)':38} {cache['rate']:8.0f} "
          f"{cache['rate'] / best[default.name]:6.2f}x {'':>9} {cache['cpu_ms']:10.1f}")
    frozen = cache["distinct"] < 0.75 * cache["seen"]
    print("* a tf.data option DataConfig cannot set; + a records setting of the pipeline, not "
          f"train_data\ncache: true holds {cache['cache_mb']:.0f} MB of parsed examples (RSS "
          f"+{cache['rss_mb']:.0f} MB); {cache['distinct']} distinct of {cache['seen']} images "
          f"in epochs 1 and 3 -> augmentation {'FROZEN' if frozen else 'varies'} (TF-Vision "
          "caches after the parser)")

    held_rate, held_cpu = (max(r[0] for r in trained["batches held in memory"]),
                           statistics.median(r[1] for r in trained["batches held in memory"]))
    print(f"\n{'training step, batch 8':38} {'images/s':>8} {'vs held':>7} {'rounds':>9} "
          f"{'CPU ms/img':>10}")
    for name, rates in trained.items():
        rate = max(r[0] for r in rates)
        print(f"{name:38} {rate:8.1f} {rate / held_rate:6.2f}x "
              f"{'/'.join(f'{r[0]:.1f}' for r in rates):>9} "
              f"{statistics.median(r[1] for r in rates):10.1f}")
    ratio, cpu_ratio = best[tuned.name] / held_rate, held_cpu / statistics.median(tuned.cpu)
    fed = max(r[0] for r in trained["fed by the tuned pipeline"]) / held_rate
    print(f"\ninput/training images/s: tuned {ratio:.1f}x, defaults "
          f"{best[default.name] / held_rate:.1f}x; per CPU ms the input is {cpu_ratio:.0f}x "
          f"cheaper than training; tuned vs defaults {best[tuned.name] / best[default.name]:.2f}x; "
          f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({
        "input_images_per_s": round(best[tuned.name], 1),
        "input_images_per_s_default": round(best[default.name], 1),
        "train_images_per_s": round(held_rate, 1),
        "ratio": round(ratio, 2),
        "ratio_default": round(best[default.name] / held_rate, 2),
        "tuned_vs_default": round(best[tuned.name] / best[default.name], 3),
        "cpu_ratio": round(cpu_ratio, 1), "fed_vs_held": round(fed, 2),
        "input_cpu_ms_per_image": round(statistics.median(tuned.cpu), 2),
        "input_cpu_ms_per_image_small_records": round(statistics.median(small.cpu), 2),
        "cache_mb": round(cache["cache_mb"]), "cache_rss_mb": round(cache["rss_mb"]),
        "cache_freezes_augmentation": frozen}))


if __name__ == "__main__":
    main()
