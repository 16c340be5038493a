"""Crash consistency of the data stages (issue #18): each of ingest, fetch, verify, label_map
and shard is SIGKILLed at seeded random moments, then re-run to completion.

After every kill: no process of the killed run is left and nothing more is written; a file
under a final name is complete (temporary names, `.tmp-*`, may hold partial data, and the
resume journals may end in a torn line, which their reader ignores). After the re-run: no
temporary name is left, and the outputs equal a clean run's byte for byte (summaries up to
the counts and timings of the attempt that wrote them).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.processes import children, gone, in_session, kill_session

IMAGES, SEED, KILLS = 160, 18, 2
STAGES = {"ingest": "ingest", "fetch": "images", "verify": "verify", "label_map": "label_map",
          "shard": "records"}  # stage -> its run folder
POOLED = {"verify", "shard"}  # stages with a process pool: the kill lands while it runs
JOURNALS = {"fetch-index.jsonl", "verify-index.jsonl"}  # append-only resume state
ATTEMPT_KEYS = {"skipped", "fetched", "copied", "linked", "downloaded", "bytes", "seconds",
                "images_per_s", "written", "cached", "reused",
                "outputs_of"}  # what one attempt did (outputs_of: its index file's identity)

Snapshot = dict[str, tuple[int, int]]  # relative path -> (size, mtime_ns)


@dataclass
class Kill:
    delay: float
    at_kill: Snapshot
    a_second_later: Snapshot
    survivors: list[int]
    not_final: list[str]  # files under a final name that are not what a clean run writes


@dataclass
class Crashes:
    stage: str
    kills: list[Kill] = field(default_factory=list)
    rerun: subprocess.CompletedProcess | None = None
    clean: dict[str, bytes] = field(default_factory=dict)
    after: dict[str, bytes] = field(default_factory=dict)


def _is_temporary(relative: str) -> bool:
    return any(part.startswith(".tmp-") for part in Path(relative).parts)


def _tree(run: Path, folder: str) -> list[Path]:
    """The stage's folder and its temporary siblings (an atomic directory's `.tmp-<name>-*`)."""
    roots = [run / folder, *run.glob(f".tmp-{folder}-*")]
    return [p for root in roots if root.exists() for p in [root, *root.rglob("*")]
            if p.is_file()]


def _snapshot(run: Path, folder: str) -> Snapshot:
    stats = {}
    for path in _tree(run, folder):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stats[str(path.relative_to(run))] = (st.st_size, st.st_mtime_ns)
    return stats


def _contents(run: Path, folder: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in _tree(run, folder)}


def _same_output(name: str, data: bytes, clean: bytes | None) -> bool:
    """A file under a final name is what the clean run wrote (a journal: whole JSON lines)."""
    if Path(name).name in JOURNALS:
        lines = data.split(b"\n")[:-1]  # a torn last line is ignored by the resume index
        try:
            return all(json.loads(line) is not None for line in lines)
        except json.JSONDecodeError:
            return False
    if clean is None:
        return False
    if Path(name).name == "summary.json":
        def outputs(raw: bytes) -> dict:
            return {k: v for k, v in json.loads(raw).items() if k not in ATTEMPT_KEYS}
        try:
            return outputs(data) == outputs(clean)
        except json.JSONDecodeError:
            return False
    return data == clean


class Pipeline:
    """The sample data through the five stages, each as `odapi stage run` in a session of
    its own (so what is left of a killed one can be found by its session id)."""

    def __init__(self, root: Path):
        from odapi_operators.core.data.sample_data import generate

        self.root, self.run = root, root / "var/runs/r1"
        generate(root / "export", count=IMAGES, seed=SEED, max_side=320)
        self.pipeline = root / "pipeline.yaml"
        self.pipeline.write_text(json.dumps({
            "home": str(root), "exports": {"path": str(root / "export")},
            "images": {"workers": 2, "max_side": 96},
            "records": {"split": {"train": 0.8, "val": 0.2}, "shards": {"train": 3, "val": 1},
                        "workers": 2},
            "train": {"model_config": "m.yaml", "steps": 1},
            "serving": {"base": "serving", "model_name": "shapes"}}))
        self.inputs: dict[str, dict] = {}
        self.window: dict[str, float] = {}  # clean run: from the kill's origin to its end

    def start(self, stage: str) -> subprocess.Popen:
        """The stage in a new session; its output goes to files (orphans of a killed stage
        would hold a pipe open)."""
        args = [sys.executable, "-m", "odapi_operators", "stage", "run", stage, "--pipeline",
                str(self.pipeline), "--run-id", "r1"]
        for key, value in self.inputs[stage].items():
            args += ["--input", key, value if isinstance(value, str) else json.dumps(value)]
        with open(self.root / "out.txt", "wb") as out, open(self.root / "err.txt", "wb") as err:
            return subprocess.Popen(args, stdout=out, stderr=err, start_new_session=True)

    def finish(self, proc: subprocess.Popen) -> subprocess.CompletedProcess:
        proc.wait(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode,
                                           (self.root / "out.txt").read_text(),
                                           (self.root / "err.txt").read_text())

    def origin(self, stage: str, proc: subprocess.Popen) -> float | None:
        """When the stage is at work: its pool is up (pooled stages), else it has started
        writing its folder. None if it ended first."""
        folder = STAGES[stage]
        while proc.poll() is None:
            if stage in POOLED:
                if children(proc.pid):
                    return time.monotonic()
            elif (self.run / folder).exists() or any(self.run.glob(f".tmp-{folder}-*")):
                return time.monotonic()
            time.sleep(0.002)
        return None

    def clean_run(self, stage: str, inputs: dict) -> dict:
        self.inputs[stage] = inputs
        proc = self.start(stage)
        origin = self.origin(stage, proc)
        done = self.finish(proc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert origin is not None, f"{stage}: no moment to kill it at"
        self.window[stage] = max(time.monotonic() - origin, 0.02)
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Pipeline, dict[str, dict[str, bytes]]]:
    """A clean run of the five stages and each stage's outputs."""
    p = Pipeline(tmp_path_factory.mktemp("crash"))
    ingested = p.clean_run("ingest", {"exports": [str(p.root / "export")]})
    fetched = p.clean_run("fetch", {"manifest": ingested["manifest"]})
    verified = p.clean_run("verify", {"manifest": fetched["manifest"]})
    mapped = p.clean_run("label_map", {"manifest": verified["manifest"]})
    p.clean_run("shard", {"manifest": verified["manifest"], "label_map": mapped["label_map"]})
    return p, {stage: _contents(p.run, folder) for stage, folder in STAGES.items()}


def _kill_once(p: Pipeline, stage: str, clean: dict[str, bytes], delay: float) -> Kill | None:
    """Start the stage, SIGKILL it `delay` s after its origin; None if it ended before."""
    folder = STAGES[stage]
    proc = p.start(stage)
    try:
        if p.origin(stage, proc) is None:
            return None
        time.sleep(delay)
        if proc.poll() is not None:
            return None
        proc.kill()
        proc.wait()
        at_kill = _snapshot(p.run, folder)
        survivors = gone(in_session(proc.pid), seconds=3)
        time.sleep(1)
        later = _snapshot(p.run, folder)
        not_final = [name for name, data in _contents(p.run, folder).items()
                     if not _is_temporary(name) and not _same_output(name, data,
                                                                     clean.get(name))]
        return Kill(delay, at_kill, later, survivors, not_final)
    finally:
        kill_session(proc.pid)  # what a kill left behind must not disturb the next attempt


def _reset(p: Pipeline, stage: str) -> None:
    """Remove what the stage wrote (the caches too: fetch, verify and shard would link what
    the clean run left there instead of doing the work a kill should interrupt)."""
    folder = STAGES[stage]
    for path in [p.run / folder, *p.run.glob(f".tmp-{folder}-*"), p.root / "var/records-cache",
                 p.root / "var/image-cache"]:
        subprocess.run(["rm", "-rf", str(path)], check=True)


@pytest.fixture(scope="module", params=list(STAGES))
def crashes(request, pipeline) -> Crashes:
    """One stage killed KILLS times at seeded random moments (each attempt resuming what the
    previous ones left), then run to completion."""
    p, outputs = pipeline
    stage, folder = request.param, STAGES[request.param]
    rng = random.Random(f"{SEED}-{stage}")
    _reset(p, stage)
    crashed = Crashes(stage, clean=outputs[stage])
    # the first kill early in the work (a pooled stage's pool is surely up), then anywhere
    spans = [0.1] + [0.9] * (KILLS - 1)
    for span in spans:
        for _ in range(6):  # under load the stage may finish first: try earlier
            kill = _kill_once(p, stage, crashed.clean, rng.uniform(0, span * p.window[stage]))
            if kill is not None:
                crashed.kills.append(kill)
                break
            span /= 2
            _reset(p, stage)
    crashed.rerun = p.finish(p.start(stage))
    crashed.after = _contents(p.run, folder)
    return crashed


def test_every_stage_was_killed_mid_run(crashes):
    assert len(crashes.kills) == KILLS, f"{crashes.stage} ended before it could be killed"


@pytest.mark.parametrize("crashes", list(STAGES), indirect=True)
def test_nothing_of_a_killed_stage_runs_or_writes_on(crashes):
    for kill in crashes.kills:
        assert kill.survivors == [], f"still running after the kill ({kill.delay:.3f} s in)"
        assert kill.a_second_later == kill.at_kill, "written after the kill"


def test_a_kill_leaves_no_partial_file_under_a_final_name(crashes):
    for kill in crashes.kills:
        assert kill.not_final == [], f"killed {kill.delay:.3f} s in"


def test_the_rerun_completes_and_equals_a_clean_run(crashes):
    assert crashes.rerun.returncode == 0, crashes.rerun.stderr[-3000:]
    final = [name for name in crashes.after if not _is_temporary(name)]
    assert sorted(final) == sorted(crashes.clean)
    differ = [name for name in final
              if Path(name).name not in JOURNALS
              and not _same_output(name, crashes.after[name], crashes.clean[name])]
    assert differ == []


def test_the_rerun_leaves_no_temporary_name(crashes):
    assert [name for name in crashes.after if _is_temporary(name)] == []
