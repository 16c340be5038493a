"""Labeling stage, declared once: the served model pre-annotates the next labeling batch."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from odapi_operators.core import storage
from odapi_operators.core.config import PipelineConfig, PreannotateConfig
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.layout import safe_run_id
from odapi_operators.core.stages.contract import Inputs, Result, StageContext, StageSpec


class Preannotated(Result):
    log_format = ("{model_version}: {selected} of {scored} scored images selected (skipped "
                  "{skipped}); tasks: {tasks}")

    out: str
    tasks: str
    selected: int
    model_version: int | str | None = None
    came_back: int | None = None


class PreannotateInputs(Inputs):
    model: str | None = Field(default=None, description="<serving base>/<model> (its "
                              "production version), a version or SavedModel folder; or TF "
                              "Serving: grpc://host:8500/MODEL, http://host:8501/v1/models/"
                              "MODEL[/versions/N|/labels/L] (default: the production version)")
    serving_dir: str | None = Field(default=None, description="with a Serving URL: the pushed "
                                    "model folder (<base>/<model>)")
    label_map: str | None = Field(default=None, description="label_map.pbtxt (default: the "
                                  "model's assets.extra)")
    sent_ledger: str | None = Field(default=None, description="what was sent before, local or "
                                    "gs:// (default: sent-<model>.jsonl beside the batch)")
    cache: str | None = Field(default=None, description="store for downloaded pool images "
                              "(default: pool-cache beside the batch)")


def batch_folder(pipeline: PipelineConfig, run_id: str) -> Path:
    """`<preannotate.out_dir>/<run id>`: each run's batch; ledger and cache sit beside."""
    return Path(pipeline.preannotate.out_dir) / safe_run_id(run_id)


def _production_model(ctx: StageContext) -> tuple[str, str | None]:
    """The production version as a folder, or as a Serving URL with its folder."""
    from odapi_operators.core.serving.serving_dir import model_dir, production_version

    serving = ctx.pipeline.serving
    version = production_version(serving.base, serving.model_name, serving)
    if version is None:
        raise StageSkipped(f"no {serving.model_name} in production under {serving.base}")
    folder = f"{model_dir(serving.base, serving.model_name)}/{version}"
    if serving.grpc_address:
        return f"grpc://{serving.grpc_address}/{serving.model_name}/versions/{version}", folder
    if serving.rest_url:
        return (f"{serving.rest_url.rstrip('/')}/v1/models/{serving.model_name}/versions/"
                f"{version}", folder)
    return folder, None


def preannotate(ctx: StageContext, inputs: PreannotateInputs,
                options: PreannotateConfig) -> Preannotated:
    """Score the pool with the model, rank by informativeness, write the top tasks."""
    from odapi_operators.core.labeling.preannotate import PreannotateOptions
    from odapi_operators.core.labeling.preannotate import preannotate as run_preannotate
    from odapi_operators.core.labeling.predictors import open_predictor, resolve_model
    from odapi_operators.core.labeling.selection import SelectionPolicy

    model, serving_dir = inputs.model, inputs.serving_dir
    if model is None:
        if ctx.pipeline is None:
            raise ValueError("give the model (a folder or a Serving URL), or a pipeline config")
        model, serving_dir = _production_model(ctx)
    if not storage.exists(options.pool):
        raise StageSkipped(f"{options.pool}: no unlabeled images to pre-annotate")
    labeled = options.labeled
    if labeled is None and ctx.pipeline is not None:
        from odapi_operators.core.labeling.labelstudio_client import ProjectSource

        exports = ctx.pipeline.exports  # a Label Studio project: what was pulled of it
        labeled = [exports.labelstudio_pulls if ProjectSource.parse(exports.path) else
                   exports.path]
    labeled = [path for path in labeled or [] if path and storage.exists(path)]
    core_options = PreannotateOptions(
        fmt=options.format, top_k=options.top_k, score_threshold=options.score_threshold,
        max_boxes=options.max_boxes, batch_size=options.batch_size,
        inline_images=options.inline_images,
        selection=SelectionPolicy(band=tuple(options.band), max_hamming=options.max_hamming))
    predictor = open_predictor(resolve_model(model, serving_dir=serving_dir,
                                             label_map=inputs.label_map))
    candidate = open_predictor(resolve_model(options.candidate)) if options.candidate else None
    try:
        summary = run_preannotate(options.pool, ctx.folder, predictor, candidate=candidate,
                                  labeled=labeled, sent_ledger=inputs.sent_ledger,
                                  cache_dir=inputs.cache, options=core_options)
    finally:
        for opened in (predictor, candidate):
            if opened is not None:
                opened.close()
    return Preannotated(**summary, tasks=summary["files"][0])


PREANNOTATE = StageSpec(name="preannotate", help="pre-annotate unlabeled images with the "
                        "production model and write the most informative ones as Prodigy or "
                        "Label Studio tasks", inputs=PreannotateInputs, result=Preannotated,
                        run=preannotate, section="preannotate", folder=batch_folder,
                        process="child")

STAGES = (PREANNOTATE,)
