"""Benchmark: a run whose dataset adds 5% new images redoes only what changed.

Issue #13: every run's manifest is the whole cumulative dataset version, so fetch, verify and
records must reuse earlier runs' work by content, or a nightly run after a small export costs
as much as the first. Goal: the second run spends at most 20% of a full preparation's time.

Sample-data images (`core/data/sample_data.py`, the `odapi sample` generator) are served over
HTTP on 127.0.0.1 (`_image_server.py`, answering each request after --delay seconds like a
real image host) or read as local files (--source local). Two runs of the data stages through
their stage functions (`runner.run_stage`: fetch, verify, label_map, shard), each in a new run
folder under one home, as a scheduled DAG run would:

1. run 1: N images, every cache cold (an empty home);
2. run 2: the same N images plus --new (5%) more, the caches under home warm.

Prints each stage's wall time for both runs, run 2's total as a share of run 1's (goal <=
0.20), the requests the image server saw in run 2, and what each stage reused. --repeat R
does the pair R times, each under a new home, and prints the medians (shared machines are
noisy).

    .venv/bin/python bench/prepare_incremental.py [--images 800] [--new 0.05] [--delay 0.1]
        [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _image_server import ImageServer  # after the path insert above

STAGES = ("fetch", "verify", "label_map", "shard")
GOAL = 0.20


def make_manifests(root: Path, count: int, new: int, side: int,
                   base_url: str | None) -> tuple[Path, Path]:
    """The sample export ingested once; run 1's manifest holds its first `count` images, run
    2's all `count + new` (manifests are in key order: the new ones land anywhere)."""
    from odapi_operators.core.data.ingest import ingest

    ingested = ingest([str(root / "export")], root / "ingest")
    first, second = [], []
    for line in Path(ingested["manifest"]).read_text().splitlines():
        record = json.loads(line)
        name = Path(record["source"]["uri"]).name
        if base_url:
            record["source"] = {"kind": "url", "uri": f"{base_url}/{name}"}
        second.append(json.dumps(record) + "\n")
        if int(Path(name).stem.rsplit("_", 1)[1]) < count:
            first.append(second[-1])
    assert len(first) == count and len(second) == count + new, (len(first), len(second))
    paths = root / "run1.jsonl", root / "run2.jsonl"
    paths[0].write_text("".join(first))
    paths[1].write_text("".join(second))
    return paths


def prepare(config, run_id: str, manifest: Path) -> tuple[dict[str, float], dict[str, dict]]:
    """The data stages of one run, in process, each timed; their results."""
    from odapi_operators.core.stages.runner import run_stage

    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}

    def stage(name: str, **inputs) -> dict:
        start = time.perf_counter()
        result = run_stage(name, pipeline=config, run_id=run_id, inputs=inputs,
                           log=lambda _: None).model_dump()
        seconds[name] = time.perf_counter() - start
        results[name] = result
        return result

    fetched = stage("fetch", manifest=str(manifest))
    verified = stage("verify", manifest=fetched["manifest"])
    mapped = stage("label_map", manifest=verified["manifest"])
    stage("shard", manifest=verified["manifest"], label_map=mapped["label_map"])
    return seconds, results


def reuse_note(results: dict[str, dict]) -> str:
    fetched, verified, records = results["fetch"], results["verify"], results["shard"]
    parts = [(f"fetch reused {fetched.get('reused', 0)}, downloaded "
              f"{fetched.get('downloaded', 0)}, copied {fetched.get('copied', 0)}"),
             f"verify reused {verified.get('reused', 0)} of {verified['ok'] + verified['failed']}"]
    if "reused_images" in records:
        parts.append(f"records reused {records['reused_images']} images "
                     f"({records.get('written', 0)} shards written)")
    else:
        parts.append(f"records {'cached' if records.get('cached') else 'written'}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800, help="run 1's images (N)")
    parser.add_argument("--new", type=float, default=0.05, help="share of N run 2 adds")
    parser.add_argument("--source", choices=("http", "local"), default="http")
    parser.add_argument("--delay", type=float, default=0.1, help="server latency, seconds")
    parser.add_argument("--image-side", type=int, default=512,
                        help="longest side of the generated images")
    parser.add_argument("--max-side", type=int, default=320,
                        help="verify shrinks larger images to this (images.max_side)")
    parser.add_argument("--shard-mb", type=int, default=4, help="records.target_shard_mb")
    parser.add_argument("--workers", type=int, default=None,
                        help="verify and shard processes (default: one per core)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs, each under a new home (medians are printed)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from odapi_operators.core.config import load_pipeline_config
    from odapi_operators.core.data.sample_data import generate

    new = max(1, math.ceil(args.images * args.new))
    with tempfile.TemporaryDirectory(prefix="odapi-bench-incr-") as name:
        root = Path(name)
        start = time.perf_counter()
        # the first N of N + new images with one seed are the N images of a smaller call
        generate(root / "export", count=args.images + new, seed=13, max_side=args.image_side)
        size = sum(p.stat().st_size for p in (root / "export").glob("*.jpg"))
        print(f"{args.images} + {new} sample JPEGs up to {args.image_side} px "
              f"({size / (args.images + new) / 1e3:.0f} kB each, generated in "
              f"{time.perf_counter() - start:.0f} s); source {args.source}"
              f"{f' (delay {args.delay * 1000:.0f} ms)' if args.source == 'http' else ''}; "
              f"images.max_side {args.max_side}, records.target_shard_mb {args.shard_mb}, "
              f"{os.cpu_count()} cores")
        server = ImageServer(root / "export", args.delay) if args.source == "http" else None
        firsts, seconds, ratios = [], [], []
        try:
            manifests = make_manifests(root, args.images, new, args.image_side,
                                       server.url("").rstrip("/") if server else None)
            for repeat in range(args.repeat):
                pipeline = root / f"pipeline{repeat}.yaml"
                pipeline.write_text(json.dumps({
                    "home": str(root / f"home{repeat}"),
                    "exports": {"path": str(root / "export")},
                    "images": {"max_side": args.max_side, "workers": args.workers},
                    "records": {"target_shard_mb": args.shard_mb, "workers": args.workers},
                    "train": {"model_config": "m.yaml", "steps": 1},
                    "serving": {"base": "serving", "model_name": "shapes"}}))
                config = load_pipeline_config(pipeline)  # a new home: every cache cold
                first, first_results = prepare(config, "run1", manifests[0])
                before = server.requests() if server else 0
                second, second_results = prepare(config, "run2", manifests[1])
                requests = (server.requests() - before) if server else None
                firsts.append(first)
                seconds.append(second)
                ratios.append(sum(second.values()) / sum(first.values()))
        finally:
            if server:
                server.close()
    first = {stage: statistics.median(f[stage] for f in firsts) for stage in STAGES}
    second = {stage: statistics.median(s[stage] for s in seconds) for stage in STAGES}
    total1, total2 = sum(first.values()), sum(second.values())
    if args.repeat > 1:
        print(f"(medians of {args.repeat} pairs; run 2 / run 1 per pair: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"\n{'stage':<10} {'run 1 (N, cold)':>16} {'run 2 (N+5%, warm)':>19} {'ratio':>7}")
    for stage in STAGES:
        print(f"{stage:<10} {first[stage]:>14.2f} s {second[stage]:>17.2f} s "
              f"{second[stage] / first[stage]:>7.2f}")
    ratio = statistics.median(ratios)
    print(f"{'total':<10} {total1:>14.2f} s {total2:>17.2f} s {total2 / total1:>7.2f}")
    print(f"\nrun 2 / run 1 = {ratio:.2f} (goal <= {GOAL:.2f}: "
          f"{'met' if ratio <= GOAL else 'NOT met'})")
    if requests is not None:
        print(f"run 2 image requests: {requests} (new images: {new})")
    print(f"run 1: {reuse_note(first_results)}")  # the last pair's
    print(f"run 2: {reuse_note(second_results)}")


if __name__ == "__main__":
    main()
