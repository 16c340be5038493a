"""The stage contract holds for every declared stage, fast: no TensorFlow, no child process.

Each declaration builds its command; the command each operator of the DAGs would run parses
and its inputs validate against the declaration; every option of a section is a flag with the
section's default; the run section records the params.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from odapi_operators.cli import build_parser
from odapi_operators.core.config import PipelineConfig, load_pipeline_config
from odapi_operators.core.stages import catalog
from odapi_operators.core.stages.runner import decode_inputs, run_stage, stage_command
from odapi_operators.stage_cli import flag_name

from conftest import ROOT

STAGES = sorted(catalog.stages())


def sample(annotation: Any) -> Any:
    """A valid value of a field type (for commands built without a real run)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is str:
        return "/runs/r/x"
    if annotation in (int, float):
        return annotation(1)
    if annotation is bool:
        return True
    if origin is Literal:
        return args[0]
    if origin is list:
        return [sample(args[0])]
    if origin is dict:
        return {"train": sample(args[1])}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {name: sample(info.annotation) for name, info in annotation.model_fields.items()}
    raise AssertionError(f"no sample for {annotation}")


@pytest.mark.parametrize("name", STAGES)
def test_declaration_is_complete(name):
    spec = catalog.get(name)
    assert spec.help and spec.process in ("worker", "child")
    if spec.section is not None:  # options are a section of the pipeline config, nothing else
        assert spec.options is PipelineConfig.model_fields[spec.section].annotation
    assert spec.result.model_fields, "a result declares its fields"


@pytest.mark.parametrize("name", STAGES)
def test_every_input_and_option_is_a_flag_with_the_sections_default(name):
    spec = catalog.get(name)
    command = build_parser()._subparsers._group_actions[0].choices[name.replace("_", "-")]
    flags = {option: action for action in command._actions for option in action.option_strings}
    positional = {action.dest for action in command._actions if not action.option_strings}
    for field, info in spec.inputs.model_fields.items():
        assert flag_name(field, info) in flags or f"in__{field}" in positional, field
    for field, info in spec.option_fields().items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            continue  # nested sections stay in the YAML
        action = flags[flag_name(field, info)]
        assert action.default is None  # unset: the section's own default applies
        if info.description:
            assert info.description.split()[0] in (action.help or "")


@pytest.mark.parametrize("name", STAGES)
def test_the_command_an_operator_runs_parses_and_its_inputs_validate(name):
    spec = catalog.get(name)
    inputs = {field: sample(info.annotation) for field, info in spec.inputs.model_fields.items()}
    args = stage_command(name, pipeline="/runs/r/config/pipeline.json", run_id="r1",
                         inputs=inputs)
    parsed = build_parser().parse_args(args)
    assert (parsed.stage, parsed.pipeline, parsed.run_id) == (name, "/runs/r/config/pipeline.json",
                                                              "r1")
    decoded = decode_inputs(spec, [tuple(pair) for pair in parsed.input or []])
    assert spec.inputs.model_validate(decoded) == spec.inputs.model_validate(inputs)


def test_a_renamed_input_fails_at_parse_time_not_in_the_child():
    with pytest.raises(ValueError, match="no input 'manifests'"):
        decode_inputs(catalog.get("verify"), [("manifests", "/x")])
    with pytest.raises(ValueError, match="no stage 'verfy'"):
        stage_command("verfy", pipeline="p", run_id="r")


def _dag(name: str, monkeypatch, tmp_path: Path, pipeline: Path | None = None):
    import importlib.util

    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG",
                       str(pipeline or ROOT / "include/configs/pipeline.yaml"))
    module_spec = importlib.util.spec_from_file_location(f"{name}_contract", ROOT / "dags" /
                                                         f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.dag


def _partitioned_pipeline(tmp_path: Path) -> Path:
    """The shipped pipeline YAML with images as partitions (mapped tasks in odapi_retrain)."""
    import yaml

    config = yaml.safe_load((ROOT / "include/configs/pipeline.yaml").read_text())
    config["home"] = str(ROOT)  # relative paths as in the shipped one
    config.setdefault("images", {})["partitions"] = 4
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stage_tasks(dag) -> list[tuple[str, Any, dict[str, Any]]]:
    """(task id, its stage's declaration, the inputs it is given) of every stage task, mapped
    ones (`.partial(...).expand(...)`) included."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from odapi_operators.operators import StageOperator

    found = []
    for task in dag.tasks:
        if isinstance(task, StageOperator):
            spec = task.spec()
            assert set(task.template_fields) == {"config", *spec.inputs.model_fields}
            found.append((task.task_id, spec,
                          {f: getattr(task, f) for f in spec.inputs.model_fields}))
        elif isinstance(task, MappedOperator) and issubclass(task.operator_class, StageOperator):
            spec = task.operator_class.spec()
            given = {**task.partial_kwargs, **task.expand_input.value}
            assert given.get("config") is not None, task.task_id
            found.append((task.task_id, spec, given))
    return found


@pytest.mark.parametrize("dag_id", ["odapi_retrain", "odapi_rollback", "odapi_preannotate",
                                    "odapi_retrain:partitioned"])
def test_every_stage_task_of_the_dags_gets_exactly_its_declared_inputs(dag_id, monkeypatch,
                                                                       tmp_path):
    name, _, variant = dag_id.partition(":")
    pipeline = _partitioned_pipeline(tmp_path) if variant else None
    stage_tasks = _stage_tasks(_dag(name, monkeypatch, tmp_path, pipeline))
    assert stage_tasks
    for task_id, spec, given in stage_tasks:
        for field, info in spec.inputs.model_fields.items():
            if info.is_required():
                assert given.get(field) is not None, f"{task_id}: {field} not wired"
    if variant:  # the images are prepared by partition, and nothing else does it
        stages = {spec.name for _, spec, _ in stage_tasks}
        assert {"prepare_partition", "shard_partition", "finish_partitions"} <= stages
        assert not {"fetch", "verify", "shard"} & stages


def test_params_land_in_the_frozen_run_section(tmp_path):
    config = load_pipeline_config(ROOT / "include/configs/pipeline.yaml", {
        "run.take_exports": "all", "run.dry_run": True, "run.force_promote": True,
        "run.reason": "label fix", "run.params": {"dry_run": True, "train_steps": 3},
        "train.steps": 3})
    frozen = json.loads(config.to_json())
    assert frozen["run"]["take_exports"] == "all" and frozen["run"]["dry_run"] is True
    assert frozen["run"]["params"] == {"dry_run": True, "train_steps": 3}
    assert PipelineConfig.model_validate(frozen) == config  # pipeline.json replays the run


def test_a_stage_runs_in_process_from_config_run_id_and_inputs(tmp_path):
    from odapi_operators.core.data.sample_data import generate

    generate(tmp_path / "export", count=4, seed=3, max_side=64)
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": str(tmp_path / "export")},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    result = run_stage("ingest", pipeline=tmp_path / "pipeline.yaml", run_id="manual__1",
                       inputs={"exports": [str(tmp_path / "export")]}, log=lambda line: None)
    assert result.images == 4 and result.manifest == str(
        tmp_path / "var/runs/manual__1/ingest/manifest.jsonl")
    assert Path(result.manifest).is_file()


@pytest.mark.parametrize("name", STAGES)
def test_a_bare_command_builds_its_options_from_the_sections_defaults(name):
    """Without --pipeline: only required options need a flag; the rest are the section's
    defaults (home-relative optional paths, like the records cache, are off)."""
    from odapi_operators.stage_cli import build_options

    spec = catalog.get(name)
    required = {field: "shapes" if field == "model_name" else sample(info.annotation)
                for field, info in spec.option_fields().items() if info.is_required()}
    options = build_options(spec, None, required)
    if spec.section is None:
        assert options is None
        return
    for field, info in spec.option_fields().items():
        if not info.is_required() and field != "cache":
            assert getattr(options, field) == info.default, field
