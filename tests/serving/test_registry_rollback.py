"""registry (append-only records per run), rollback of `stable`, and the `odapi` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from odapi_operators.cli import build_parser, main
from odapi_operators.cli_models import cmd_models_list
from odapi_operators.core.evaluation.gate import GatePolicy, gate
from odapi_operators.core.layout import RunLayout, Stage
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry
from odapi_operators.core.serving.models_config import ServingOptions
from odapi_operators.core.serving.promote import promote
from odapi_operators.core.serving.push import push
from odapi_operators.core.serving.rollback import RollbackError, previous_stable, rollback

from support.fakes import fake_saved_model, promoted_fakes

POLICY = GatePolicy(min_ap50=0.5, vs_production={"AP": {}})


def retrain(tmp_path: Path, serving: Path, run_id: str, ap: float,
            baseline: int | None = None) -> dict:
    """What one DAG run leaves behind: metrics, decision, maybe a push; then its record."""
    run = RunLayout(tmp_path / "runs", run_id)
    (run.stage(Stage.CONFIG)).mkdir(parents=True)
    (run.stage(Stage.CONFIG) / "pipeline.json").write_text("{}")
    (run.stage(Stage.INGEST)).mkdir()
    (run.stage(Stage.INGEST) / "summary.json").write_text(
        json.dumps({"fingerprint": f"fp-{run_id}-0123456789"}))
    metrics = run.stage(Stage.EVALUATE) / "candidate" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"AP": ap, "AP50": ap + 0.2, "eval_images": 40,
                                   "checkpoint": "ckpt-1"}))
    base_metrics = None
    if baseline is not None:
        base_metrics = tmp_path / f"baseline-{run_id}.json"
        base_metrics.write_text(json.dumps({"AP": 0.5, "AP50": 0.7, "eval_images": 40}))
    decision = gate(metrics, run.stage(Stage.GATE), POLICY, baseline_version=baseline,
                    baseline_metrics=base_metrics)
    if decision["promoted"]:
        pushed = push(fake_saved_model(tmp_path / f"export-{run_id}", run_id), serving, "shapes",
                      run_id, run.stage(Stage.PUSH))
        promote(serving, "shapes", pushed["version"])
    return registry.register_run(serving / "registry.jsonl", run.root, "shapes", run_id)


@pytest.fixture()
def served(tmp_path) -> Path:
    """Two promoted retrains (versions 1, 2) and one rejected candidate."""
    serving = tmp_path / "serving"
    retrain(tmp_path, serving, "run1", 0.5)
    retrain(tmp_path, serving, "run2", 0.6, baseline=1)
    retrain(tmp_path, serving, "run3", 0.4, baseline=2)
    return serving


# --- registry ------------------------------------------------------------------------------


def test_record_per_run_has_everything(served, tmp_path):
    records = registry.candidates(registry.read(served / "registry.jsonl"))
    assert [r["run_id"] for r in records] == ["run1", "run2", "run3"]
    first, second, rejected = records
    assert first["dataset_version"] == "fp-run1-0123456789"
    assert first["config"].endswith("run1/config/pipeline.json")
    assert first["metrics"] == {"AP": 0.5, "AP50": 0.7, "eval_images": 40}
    assert first["decision"]["rule"] == "first_model" and first["decision"]["promoted"]
    assert first["decision"]["path"].endswith("run1/gate/decision.json")
    assert (first["version"], first["path"]) == (1, str(served / "shapes" / "1"))
    assert second["decision"]["baseline"]["version"] == 1 and second["version"] == 2
    assert rejected["decision"]["promoted"] is False and rejected["version"] is None
    assert all(r["recorded_at"] and r["decided_at"] for r in records)


def test_registry_is_append_only_and_retries_do_not_grow_it(served, tmp_path):
    path = served / "registry.jsonl"
    before = path.read_bytes()
    run = RunLayout(tmp_path / "runs", "run3").root
    registry.register_run(path, run, "shapes", "run3")  # the same record again
    assert path.read_bytes() == before
    (run / "evaluate" / "candidate" / "metrics.json").write_text(json.dumps({"AP": 0.41}))
    registry.register_run(path, run, "shapes", "run3")  # e.g. re-evaluated on retry
    after = path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    newest = registry.candidates(registry.read(path))
    assert [r["run_id"] for r in newest] == ["run1", "run2", "run3"]
    assert newest[-1]["metrics"] == {"AP": 0.41}


def test_corrupt_registry_line_is_named(tmp_path):
    path = tmp_path / "registry.jsonl"
    path.write_text('{"kind": "candidate"}\nnot json\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON record"):
        registry.read(path)


TORN = '{"action": "promote", "by": null, "kind": "label", "label": "sta'  # killed mid-append


def test_torn_last_line_never_blocks_and_the_next_move_is_recorded(served, tmp_path, caplog,
                                                                   capsys):
    path = served / "registry.jsonl"
    whole = path.read_text()
    path.write_text(whole + TORN)

    run_cli(["models", "list", "--serving-base", str(served)])
    assert len(capsys.readouterr().out.splitlines()) == 1 + 5  # the torn record left out
    assert f"{path}:6: a torn last line" in caplog.text
    source = fake_saved_model(tmp_path / "run4" / "sm", "4")
    run_cli(["push", "--saved-model", str(source), "--base", str(served), "--model-name",
             "shapes", "--out", str(tmp_path / "run4" / "push")])

    assert labels(served) == {"stable": 3}
    text = path.read_text()
    assert text.startswith(whole) and text.count("\n") == whole.count("\n") + 1  # repaired
    moved = registry.read(path)[-1]
    assert (moved["action"], moved["previous"], moved["version"]) == ("promote", 2, 3)
    assert rollback(served, "shapes", reason="drift")["version"] == 2


def test_a_last_record_without_its_newline_is_kept_and_not_glued_to(tmp_path):
    path = tmp_path / "registry.jsonl"
    registry.record_label(path, "shapes", "stable", 1, None, "promote")
    path.write_text(path.read_text().rstrip("\n"))  # killed between the record and its newline
    assert [r["version"] for r in registry.read(path)] == [1]
    registry.record_label(path, "shapes", "stable", 2, 1, "promote")
    assert [r["version"] for r in registry.read(path)] == [1, 2]


def test_a_bad_line_before_the_last_still_refuses(tmp_path):
    path = tmp_path / "registry.jsonl"
    path.write_text('{"kind": "candidate"}\n{"kind": "lab\n{"kind": "candidate"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON record"):
        registry.read(path)
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON record"):
        registry.record_label(path, "shapes", "stable", 2, 1, "promote")


def test_a_move_killed_before_its_record_is_recorded_with_its_real_previous(tmp_path):
    """The label already points at the target (the kill came between the label write and the
    registry append): the re-run records the move once, from the previously recorded version."""
    serving = tmp_path / "serving"
    for i in (1, 2):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}")
    promote(serving, "shapes", 1)
    serving_config.move_label(serving / "models.config", "shapes", str(serving / "shapes"),
                              "stable", 2, [1, 2])  # the move without its record
    assert promote(serving, "shapes", 2)["previous"] == 1
    moves = [(r["previous"], r["version"]) for r in registry.read(serving / "registry.jsonl")]
    assert moves == [(None, 1), (1, 2)]


# --- rollback ------------------------------------------------------------------------------


def labels(serving: Path) -> dict[str, int]:
    config = serving_config.read(serving / "models.config")
    return serving_config.labels(serving_config.entry(config, "shapes"))


def test_rollback_defaults_to_previous_stable_and_is_recorded(served):
    assert labels(served) == {"stable": 2}
    result = rollback(served, "shapes", reason="bad on night images", by="ana")
    assert (result["previous"], result["version"]) == (2, 1)
    assert labels(served) == {"stable": 1}
    model = serving_config.entry(serving_config.read(served / "models.config"), "shapes")
    assert list(model.model_version_policy.specific.versions) == [1, 2]  # 2 still loaded
    event = registry.read(served / "registry.jsonl")[-1]
    assert {k: event[k] for k in ("kind", "label", "version", "previous", "action", "reason",
                                  "by")} == {"kind": "label", "label": "stable", "version": 1,
                                             "previous": 2, "action": "rollback",
                                             "reason": "bad on night images", "by": "ana"}


def test_rollback_to_a_named_version_and_back_forward(served):
    rollback(served, "shapes", to=1)
    assert labels(served) == {"stable": 1}
    rollback(served, "shapes", to=2, reason="false alarm")
    assert labels(served) == {"stable": 2}


def test_rollback_refuses_versions_serving_cannot_load(served):
    (served / "shapes" / "1" / "saved_model.pb").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{served / 'shapes' / '1'}: no saved_model"):
        rollback(served, "shapes", to=1)
    with pytest.raises(FileNotFoundError, match="versions: \\[2\\]"):
        rollback(served, "shapes", to=7)
    with pytest.raises(RollbackError, match="no version older than stable 2"):
        rollback(served, "shapes")
    assert labels(served) == {"stable": 2}


def test_rollback_refuses_without_stable_or_to_current(tmp_path, served):
    with pytest.raises(RollbackError, match="already stable"):
        rollback(served, "shapes", to=2)
    with pytest.raises(RollbackError, match="'other' has no stable label"):
        rollback(served, "other")


@pytest.mark.parametrize("history,current,available,expected", [
    ([1, 2, 3], 3, [1, 2, 3], 2),
    ([1, 3], 3, [1, 2, 3], 1),  # 2 was never stable
    ([1, 2, 3, 2], 2, [1, 2, 3], 1),  # a second rollback goes further back, not to 3
    ([1, 2, 3], 3, [2, 3], 2),
    ([], 3, [1, 2, 3], 2),  # no history: the previous version
    ([3], 3, [3], None),
])
def test_previous_stable(history, current, available, expected):
    assert previous_stable(history, current, available) == expected


def test_rollback_keeps_a_latest_policy(tmp_path):
    serving = tmp_path / "serving"
    options = ServingOptions(version_policy="latest", latest_versions=2)
    promoted_fakes(tmp_path, serving, options)
    run_cli(["rollback", "--model-name", "shapes", "--base", str(serving), "--reason", "test"])
    model = serving_config.entry(serving_config.read(serving / "models.config"), "shapes")
    assert serving_config.policy_kind(model) == "latest"
    assert dict(model.version_labels) == {"stable": 1}


# --- the commands --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    return build_parser()


def run_cli(argv: list[str]) -> None:
    assert main(argv) == 0


def test_argparse_wiring():
    args = parser().parse_args(["rollback", "--model-name", "m", "--to", "3", "--reason", "r",
                                "--base", "/s"])
    assert (args.opt__model_name, args.in__to, args.in__reason, args.opt__base) == (
        "m", 3, "r", "/s")
    args = parser().parse_args(["models", "list", "--json"])
    assert (args.model, args.json, args.func) == (None, True, cmd_models_list)
    with pytest.raises(SystemExit):
        parser().parse_args(["rollback", "--to", "x"])  # not a version number
    with pytest.raises(SystemExit):
        parser().parse_args(["models"])  # an action is required


def test_cli_rollback_prints_result(served, capsys, monkeypatch):
    monkeypatch.setenv("USER", "ops")
    run_cli(["rollback", "--model-name", "shapes", "--base", str(served), "--reason", "drift"])
    result = json.loads(capsys.readouterr().out)
    assert (result["version"], result["previous"], result["labels"]) == (1, 2, {"stable": 1})
    assert registry.read(served / "registry.jsonl")[-1]["by"] == "ops"


def test_models_list_table_after_two_retrains_and_a_rollback(served, capsys):
    rollback(served, "shapes", reason="drift")
    capsys.readouterr()
    run_cli(["models", "list", "--serving-base", str(served)])
    table = capsys.readouterr().out.splitlines()
    print("\n".join(table))  # shown with -s: the demo output
    assert table[0].split() == ["RECORDED", "MODEL", "RUN", "DATASET", "AP", "AP50",
                                "DECISION", "VERSION", "LABELS"]
    body = [line.split() for line in table[1:]]
    # a run's record is written when the run ends, after the label move it made
    assert [row[2] for row in body] == ["-", "run1", "-", "run2", "run3", "-"]
    assert " ".join(body[0][6:]) == "promote: stable none -> 1 1 -"
    assert body[1][3:] == ["fp-run1-0123", "0.500", "0.700", "first", "model", "1", "stable"]
    assert body[3][6:] == ["promoted", "2", "-"]
    assert body[4][6:] == ["rejected", "-", "-"]
    assert " ".join(body[5][6:]) == "rollback: stable 2 -> 1 (drift) 1 -"


def test_models_list_json_and_model_filter(served, capsys):
    run_cli(["models", "list", "--serving-base", str(served), "--json", "--model", "shapes"])
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == {"shapes": {"stable": 2}}
    assert [r.get("run_id", r["kind"]) for r in out["records"]] == [
        "label", "run1", "label", "run2", "run3"]
    run_cli(["models", "list", "--serving-base", str(served), "--model", "nothing"])
    assert capsys.readouterr().out.strip() == "no records"
