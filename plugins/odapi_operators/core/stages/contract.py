"""The stage contract: a stage is declared once and every runner reads the declaration.

A declaration names the stage, its typed inputs (what it takes from upstream stages: paths,
versions), the pipeline-config section that holds its options (that section's pydantic model
is the only place an option and its default live), its run-folder, where it runs (the
worker's own process, or a child process for TensorFlow and process pools) and its typed
result. From that one declaration:

- `runner.run_stage` runs it in process, from (frozen pipeline config, run id, inputs);
- `runner.stage_command` is the `odapi stage run ...` command a child process or a pod runs;
- `cli.add_stage_commands` builds `odapi <stage>` with a flag per input and per option;
- the Airflow operators are generic over it (`StageOperator`).

Options shared by several stages of one section can say which stage uses them
(`json_schema_extra={"stages": [...]}`) so each command offers only its own flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from odapi_operators.core.layout import RunLayout, Stage

if TYPE_CHECKING:
    from odapi_operators.core.config import PipelineConfig


class Inputs(BaseModel):
    """What a stage takes from upstream stages (paths, versions); strict, so a renamed input
    fails loudly wherever it is passed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoInputs(Inputs):
    pass


class Result(BaseModel):
    """What a stage returns. Declared fields are the contract (XCom, downstream inputs);
    extra keys the stage reports (counts, timings) ride along to its JSON summary."""

    model_config = ConfigDict(extra="allow")
    log_format: ClassVar[str | None] = None  # str.format over the result, extras included
    # a list field that downstream tasks map over: an operator returns it alone
    items: ClassVar[str | None] = None

    def contract(self) -> dict[str, Any]:
        """The declared fields only, JSON-ready: what an operator pushes to XCom."""
        return self.model_dump(mode="json", include=set(type(self).model_fields))

    def log_line(self) -> str:
        """One line for the task log: `log_format` (a key the result lacks shows as `-`),
        else the declared fields."""
        if self.log_format:
            return self.log_format.format_map(_OrDash(self.model_dump()))
        return ", ".join(f"{k}={v}" for k, v in self.contract().items())


class _OrDash(dict):
    def __missing__(self, key: str) -> str:
        return "-"


I = TypeVar("I", bound=Inputs)
O = TypeVar("O", bound=BaseModel)
R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class StageContext:
    """Where and for which run a stage executes.

    `pipeline` is the frozen run config when the stage runs in a pipeline (it carries the
    other sections a stage may consult, such as the serving base); None for a bare
    `odapi <stage> --out DIR`, where every such value is an input instead.
    """

    folder: Path
    pipeline: PipelineConfig | None = None
    run_id: str | None = None
    log: Callable[[str], None] = print
    progress: dict[str, Any] = field(default_factory=dict)  # `bar`/`log` for long stages

    @property
    def layout(self) -> RunLayout | None:
        if self.pipeline is None or self.run_id is None:
            return None
        return RunLayout(self.pipeline.runs, self.run_id)


@dataclass(frozen=True)
class StageSpec(Generic[I, O, R]):
    """One stage, declared once (see the module docstring)."""

    name: str
    help: str
    inputs: type[I]
    result: type[R]
    run: Callable[[StageContext, I, Any], R]
    section: str | None = None  # the pipeline config section holding its options
    # its folder: one of the run layout's, or a function of (pipeline, run id) for a stage
    # that writes outside the run folder; None: the run folder itself
    folder: Stage | Callable[[Any, str], Path] | None = None
    process: Literal["worker", "child"] = "worker"

    @property
    def options(self) -> type[BaseModel] | None:
        """The options model: the type of the pipeline config's `section` field."""
        if self.section is None:
            return None
        from odapi_operators.core.config import PipelineConfig

        return PipelineConfig.model_fields[self.section].annotation

    def option_fields(self) -> dict[str, Any]:
        """The options fields this stage uses: the section's, minus those another stage owns."""
        model = self.options
        if model is None:
            return {}
        fields = {}
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            owners = extra.get("stages")
            if owners is None or self.name in owners:
                fields[name] = info
        return fields

    def folder_for(self, pipeline: PipelineConfig | None, run_id: str | None,
                   out: str | Path | None) -> Path:
        """`out` if given, else the run layout's folder for this stage."""
        if out is not None:
            return Path(out)
        if self.folder is None and (pipeline is None or run_id is None):
            return Path.cwd()  # a stage that writes no folder of its own
        if pipeline is None or run_id is None:
            raise ValueError(f"stage {self.name}: give an output folder, or a pipeline config "
                             "and a run id")
        if callable(self.folder):
            return Path(self.folder(pipeline, run_id))
        layout = RunLayout(pipeline.runs, run_id)
        return layout.stage(self.folder) if self.folder else layout.root

    def options_of(self, pipeline: PipelineConfig | None) -> BaseModel | None:
        if self.section is None or pipeline is None:
            return None
        return getattr(pipeline, self.section)
