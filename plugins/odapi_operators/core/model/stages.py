"""Model stages, declared once: train, evaluate (candidate and production), export.

All of them load TensorFlow, so they run in a child process (`process="child"`): the worker
never holds TensorFlow or GPU memory after the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from odapi_operators.core.config import EvaluateConfig, ExportConfig, TrainConfig
from odapi_operators.core.layout import METRICS, RunFile, Stage
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec
from odapi_operators.core.wording import setting

if TYPE_CHECKING:
    from odapi_operators.core.model.detector import Detector

# --- train ----------------------------------------------------------------------------------

class TrainInputs(Inputs):
    data: str = Field(description="records folder written by the shard stage")
    warm_start_from: str | None = Field(
        default=None, description="<serving base>/<model> to warm start from (default with "
                                  "--warm-start: the pipeline's serving model)")


class Trained(Result):
    model_dir: str
    checkpoint: str
    steps: int

    def log_line(self) -> str:
        start = getattr(self, "start", None) or {}
        return f"trained to step {self.steps} ({start.get('reason', 'resumed')})"


def train(ctx: StageContext, inputs: TrainInputs, options: TrainConfig) -> Trained:
    """Train (or resume) in the run's model dir; a retry resumes from the newest checkpoint."""
    from odapi_operators.core.model.train import train as train_detector

    warm_from = inputs.warm_start_from
    if options.warm_start and not warm_from and not options.init_checkpoint:
        if ctx.pipeline is None:  # no serving folder known: nothing is in production for us
            ctx.log("warm start: no pipeline config and no serving model folder given "
                    f"({setting('warm_start_from')}): from scratch")
        else:
            from odapi_operators.core.serving.serving_dir import model_dir

            warm_from = model_dir(ctx.pipeline.serving.base, ctx.pipeline.serving.model_name)
    summary = train_detector(options.model_config_path, inputs.data, ctx.folder, options.steps,
                             options.batch_size, init_checkpoint=options.init_checkpoint,
                             warm_start_from=warm_from,
                             warm_start_steps=options.warm_start_steps,
                             warm_start_lr_factor=options.warm_start_lr_factor)
    return Trained(**summary)


TRAIN = StageSpec(name="train", help="train a TF-Vision detector (resumes from the model dir)",
                  inputs=TrainInputs, result=Trained, run=train, section="train",
                  folder=Stage.TRAIN, process="child")


# --- evaluate ------------------------------------------------------------------------------

def _diff() -> Any:
    return Field(default=None, description="the dataset version's diff.json: its added and "
                 "changed val images are the `new` slice, the others `old` (none: slice `all` "
                 "only)")


class EvaluateInputs(Inputs):
    model: str = Field(description="a training model dir or a SavedModel folder")
    data: str = Field(description="records folder (its val split is evaluated)")
    diff: str | None = _diff()


class Evaluated(Result):
    metrics: str | None
    AP: float | None = None
    AP50: float | None = None
    version: int | None = None  # the production version evaluated (evaluate_production)
    # the candidate's checked export, made in the evaluation's process (export_ahead)
    export_ahead: str | None = None

    def log_line(self) -> str:
        if self.metrics is None:
            return "no model in production yet: the gate applies the first-model rule"
        extra = self.model_extra or {}
        slices = "; ".join(f"{name}: AP50 {s.get('AP50')} on {s.get('images')}"
                           for name, s in (extra.get("slices") or {}).items() if name != "all")
        return (f"{extra.get('model')}: AP {self.AP}, AP50 {self.AP50} on "
                f"{extra.get('eval_images')} val images; per class: {extra.get('per_class')}"
                + (f"; slices {slices}" if slices else ""))


def _evaluate(ctx: StageContext, model: str, data: str, diff: str | None,
              options: EvaluateConfig, version: int | None = None,
              detector: Detector | None = None) -> Evaluated:
    from odapi_operators.core.evaluation.evaluate import evaluate as evaluate_model

    summary = evaluate_model(model, data, ctx.folder / METRICS, min_images=options.min_images,
                             missing_classes=options.missing_classes, diff=diff,
                             detector=detector)
    return Evaluated(**summary, version=version)


def _ahead(ctx: StageContext, model: str, options: EvaluateConfig) -> ExportConfig | None:
    """The export options if the candidate `model` is to be exported in its evaluation's
    process (`evaluate.export_ahead`, a training model dir, a run folder to write it in)."""
    from odapi_operators.core.model.tfvision import TRAIN_INFO

    if not options.export_ahead or ctx.pipeline is None or ctx.layout is None:
        return None
    return ctx.pipeline.export if (Path(model) / TRAIN_INFO).is_file() else None


def evaluate(ctx: StageContext, inputs: EvaluateInputs, options: EvaluateConfig) -> Evaluated:
    """COCO metrics of a model on the val split and its slices: metrics.json, detections,
    ground truth, per-image matches. A candidate is then exported ahead (`export_ahead`)
    with the model already in memory; a failed export ahead is logged, not fatal: the export
    task exports on its own and reports."""
    export = _ahead(ctx, inputs.model, options)
    if export is None:
        return _evaluate(ctx, inputs.model, inputs.data, inputs.diff, options)
    from odapi_operators.core.model.detector import load_detector
    from odapi_operators.core.model.exporter import export as export_model

    detector = load_detector(inputs.model, export.input_type)
    result = _evaluate(ctx, inputs.model, inputs.data, inputs.diff, options, detector=detector)
    folder = ctx.layout.stage(Stage.EXPORT_AHEAD)
    try:
        export_model(inputs.model, inputs.data, folder, export.input_type,
                     model_name=_model_name(ctx, None), warmup_images=export.warmup_images,
                     module=detector.module, log=ctx.log)
    except Exception as error:  # noqa: BLE001  (the export task repeats it and fails there)
        ctx.log(f"export ahead failed; the export task will export on its own: {error!r}")
        return result
    ctx.log(f"exported ahead to {folder}")
    return result.model_copy(update={"export_ahead": str(folder)})


class ProductionInputs(Inputs):
    data: str = Field(description="records folder (its val split is evaluated)")
    diff: str | None = _diff()


def evaluate_production(ctx: StageContext, inputs: ProductionInputs,
                        options: EvaluateConfig) -> Evaluated:
    """The SavedModel Serving answers with, on this run's val split: the gate's baseline,
    measured like the candidate. Version None when nothing serves yet."""
    from odapi_operators.core.serving.serving_dir import model_dir, production_version

    if ctx.pipeline is None:
        raise ValueError("evaluate_production needs the pipeline config (serving section)")
    serving = ctx.pipeline.serving
    version = production_version(serving.base, serving.model_name, serving)
    if version is None:
        return Evaluated(metrics=None)
    return _evaluate(ctx, f"{model_dir(serving.base, serving.model_name)}/{version}",
                     inputs.data, inputs.diff, options, version)


EVALUATE = StageSpec(name="evaluate", help="COCO metrics of a model on the val split",
                     inputs=EvaluateInputs, result=Evaluated, run=evaluate,
                     section="evaluate", folder=Stage.EVALUATE_CANDIDATE, process="child")
EVALUATE_PRODUCTION = StageSpec(
    name="evaluate_production", help="COCO metrics of the production model on the same split",
    inputs=ProductionInputs, result=Evaluated, run=evaluate_production, section="evaluate",
    folder=Stage.EVALUATE_PRODUCTION, process="child")


# --- export -----------------------------------------------------------------------------------

class ExportInputs(Inputs):
    model_dir: str = Field(description="training model dir (its newest checkpoint)")
    data: str = Field(description="records folder (warmup requests from its val split)")
    extras: list[str] = Field(default=[], description="files to ship in assets.extra/ "
                              "(config, metrics, decision)")
    model_name: str | None = Field(default=None, description="model name in the warmup "
                                   "requests (default: serving.model_name, else 'model')")
    exported_ahead: str | None = Field(
        default=None, description="the candidate's export made by its evaluation "
        "(export_ahead): copied with the extras added when it is of the same checkpoint and "
        "settings, else exported anew")


class Exported(Result):
    log_format = "export checked: {check}"

    saved_model: str


def _model_name(ctx: StageContext, given: str | None) -> str:
    """The model name in warmup requests: given, else serving.model_name, else 'model'."""
    return given or (ctx.pipeline.serving.model_name if ctx.pipeline else None) or "model"


def export(ctx: StageContext, inputs: ExportInputs, options: ExportConfig) -> Exported:
    """Export and check a SavedModel (or finish the one exported ahead); the run's frozen
    config rides along in assets.extra."""
    from odapi_operators.core.model.exporter import export as export_model

    extras = list(inputs.extras)
    if ctx.layout is not None and ctx.layout.file(RunFile.CONFIG).exists():
        extras.insert(0, str(ctx.layout.file(RunFile.CONFIG)))
    return Exported(**export_model(inputs.model_dir, inputs.data, ctx.folder,
                                   options.input_type,
                                   model_name=_model_name(ctx, inputs.model_name),
                                   extras=extras, warmup_images=options.warmup_images,
                                   ahead=inputs.exported_ahead, log=ctx.log))


EXPORT = StageSpec(name="export", help="export and check a SavedModel (with warmup requests)",
                   inputs=ExportInputs, result=Exported, run=export, section="export",
                   folder=Stage.EXPORT, process="child")

STAGES = (TRAIN, EVALUATE, EVALUATE_PRODUCTION, EXPORT)
