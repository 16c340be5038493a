"""Run a declared stage: in this process, or as the command a child process or pod runs.

All three start from the same triple (frozen pipeline config, run id, inputs) and end in the
stage's typed result, so a stage cannot behave differently in Airflow, in a pod or in a
terminal. The command is `odapi stage run STAGE --pipeline FILE --run-id ID --input NAME
VALUE ...`; it writes the result as JSON to `--result-file` (and stdout) and reports why it
failed as its exit status (`failures.EXIT_CODES`).
"""

from __future__ import annotations

import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from odapi_operators.core import storage
from odapi_operators.core.failures import EXIT_SKIPPED, StageSkipped, failure_from_exit
from odapi_operators.core.stages import catalog
from odapi_operators.core.stages.child import ChildStageError, run_child
from odapi_operators.core.stages.contract import Result, StageContext, StageSpec

if typing.TYPE_CHECKING:
    from odapi_operators.core.config import PipelineConfig


def load_pipeline(pipeline: PipelineConfig | str | os.PathLike | None) -> PipelineConfig | None:
    """A frozen `pipeline.json` (what runs read), or a pipeline YAML (for a person at a
    terminal), or an already loaded config."""
    from odapi_operators.core.config import PipelineConfig, load_pipeline_config, read_frozen_config

    if pipeline is None or isinstance(pipeline, PipelineConfig):
        return pipeline
    if str(pipeline).endswith((".yaml", ".yml")):
        return load_pipeline_config(pipeline)
    return read_frozen_config(pipeline)


def run_stage(name: str, *, pipeline: PipelineConfig | str | os.PathLike | None = None,
              run_id: str | None = None, inputs: dict[str, Any] | None = None,
              options: BaseModel | None = None, out: str | Path | None = None,
              log: Callable[[str], None] = print,
              progress: dict[str, Any] | None = None) -> Result:
    """Run stage `name` here. `options` replaces the pipeline's section (the CLI builds it
    from flags); `out` replaces the run layout's folder."""
    spec = catalog.get(name)
    config = load_pipeline(pipeline)
    given = spec.inputs.model_validate(inputs or {})
    chosen = options if options is not None else spec.options_of(config)
    if spec.section is not None and chosen is None:
        raise ValueError(f"stage {name}: needs its `{spec.section}` options (a pipeline "
                         "config, or the command's flags)")
    context = StageContext(folder=spec.folder_for(config, run_id, out), pipeline=config,
                           run_id=run_id, log=log, progress=progress or {})
    # A killed attempt's temporaries (its processes are gone: see child.py) go before the
    # re-run writes, so a retry leaves the folder as a clean run would.
    if spec.folder is not None and (swept := storage.sweep_temporaries(context.folder)):
        log(f"{name}: removed {swept} temporaries of an earlier, killed attempt")
    result = spec.run(context, given, chosen)
    return spec.result.model_validate(result) if not isinstance(result, spec.result) else result


def _encode(value: Any) -> Any:
    """Command-line form of an input value: strings as they are (XComArgs and templates too,
    for a pod's templated arguments), everything else as JSON."""
    if isinstance(value, str) or not isinstance(value, (int, float, bool, list, tuple, dict,
                                                        type(None))):
        return value
    return json.dumps(value)


def stage_command(name: str, *, pipeline: Any, run_id: Any,
                  inputs: dict[str, Any] | None = None,
                  result_file: str | None = None) -> list[Any]:
    """`odapi` arguments that run stage `name` for one run, wherever they run; the result
    also goes to `result_file` (a child's temporary file, a pod's XCom file)."""
    catalog.get(name)  # an unknown stage fails here, at parse time, not in the child
    args: list[Any] = ["stage", "run", name, "--pipeline", pipeline, "--run-id", run_id]
    for key, value in (inputs or {}).items():
        if value is not None:  # left out: the input's default
            args += ["--input", key, _encode(value)]
    if result_file is not None:
        args += ["--result-file", result_file]
    return args


def _takes_text_only(annotation: Any) -> bool:
    """True for `str` and `str | None` fields: their values are never JSON-decoded."""
    if annotation is str:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return all(a in (str, type(None)) for a in typing.get_args(annotation))
    return False


def decode_inputs(spec: StageSpec, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`--input NAME VALUE` pairs back into values: text fields verbatim, others as JSON."""
    fields = spec.inputs.model_fields
    decoded: dict[str, Any] = {}
    for key, value in pairs:
        if key not in fields:
            raise ValueError(f"stage {spec.name}: no input {key!r} (inputs: "
                             f"{', '.join(fields) or 'none'})")
        if _takes_text_only(fields[key].annotation):
            decoded[key] = value
        else:
            try:
                decoded[key] = json.loads(value)
            except json.JSONDecodeError:
                decoded[key] = value  # a bare word for a list or number: pydantic says why
    return decoded


def run_stage_in_child(name: str, *, pipeline: str | os.PathLike, run_id: str,
                       inputs: dict[str, Any] | None = None,
                       log: Callable[[str], None] = print) -> Result:
    """Run the stage as `python -m odapi_operators stage run ...` in a child process.

    Its output streams to `log`; a skip comes back as StageSkipped, a failure as
    ChildStageError carrying the failure kind the child reported.
    """
    spec = catalog.get(name)
    fd, result_file = tempfile.mkstemp(prefix=f"odapi-{name}-", suffix=".json")
    os.close(fd)
    try:
        code, tail = run_child(stage_command(name, pipeline=str(pipeline), run_id=run_id,
                                             inputs=inputs, result_file=result_file), log)
        if code == 0:
            return spec.result.model_validate_json(Path(result_file).read_text())
        if code == EXIT_SKIPPED:
            raise StageSkipped(tail[-1] if tail else f"{name}: nothing to do")
        raise ChildStageError(f"odapi stage run {name} failed with exit code {code}:\n"
                              + "\n".join(tail), failure_from_exit(code))
    finally:
        Path(result_file).unlink(missing_ok=True)
