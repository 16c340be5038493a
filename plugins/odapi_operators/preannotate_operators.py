"""Operators that close the labeling loop: the served model pre-annotates the next batch.

Like the stage operators they take `config` (the run's frozen pipeline config) and run the
TensorFlow part as a child process (`odapi preannotate`).
"""

from __future__ import annotations

from typing import Any, Sequence

from odapi_operators.operators import OdapiStageOperator


class PreannotateOperator(OdapiStageOperator):
    """Pre-annotate the `images` pool with the production model; write the next labeling
    batch.

    The model is the version Serving answers with (`stable`, else the newest) under the
    config's serving base; with a Serving address configured (`serving.grpc_address` /
    `rest_url`) that version answers over the wire, else it is loaded in the child. The batch
    goes to `<out_dir>/<run id>/`; the sent ledger (`<out_dir>/sent-<model>.jsonl`) and the
    download cache (`<out_dir>/pool-cache`) are shared by every run. `labeled` paths that
    exist (manifests or exports) count as labeled already. Skips when nothing is in
    production or the pool does not exist.
    """

    template_fields: Sequence[str] = ("config", "images", "out_dir", "fmt", "top_k",
                                      "score_threshold", "max_boxes", "candidate", "labeled")

    def __init__(self, *, images: Any, out_dir: Any, fmt: Any = "prodigy", top_k: Any = None,
                 score_threshold: Any = 0.3, max_boxes: Any = 20, candidate: Any = None,
                 labeled: Any = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images, self.out_dir, self.fmt = images, out_dir, fmt  # `pool`: the Airflow pool
        self.top_k, self.score_threshold, self.max_boxes = top_k, score_threshold, max_boxes
        self.candidate, self.labeled = candidate, labeled

    def model_args(self, cfg: Any, version: int) -> list[str]:
        """`--model` (and `--serving-dir`) for production version `version`."""
        from odapi_operators.core.serving.serving_dir import model_dir

        folder = f"{model_dir(cfg.base, cfg.model_name)}/{version}"
        if cfg.grpc_address:
            url = f"grpc://{cfg.grpc_address}/{cfg.model_name}/versions/{version}"
        elif cfg.rest_url:
            url = f"{cfg.rest_url.rstrip('/')}/v1/models/{cfg.model_name}/versions/{version}"
        else:
            return ["--model", folder]
        return ["--model", url, "--serving-dir", folder]

    def execute(self, context: Any) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from odapi_operators.core import storage
        from odapi_operators.core.layout import safe_run_id
        from odapi_operators.core.serving.serving_dir import production_version

        cfg = self.pipeline().serving
        version = production_version(cfg.base, cfg.model_name, cfg)
        if version is None:
            raise AirflowSkipException(f"no {cfg.model_name} in production under {cfg.base}")
        if not storage.exists(str(self.images)):
            raise AirflowSkipException(f"{self.images}: no unlabeled images to pre-annotate")
        out_dir = str(self.out_dir).rstrip("/")
        args = ["preannotate", *self.model_args(cfg, version), "--images", str(self.images),
                "--out", f"{out_dir}/{safe_run_id(context['run_id'])}",
                "--format", str(self.fmt), "--score-threshold", str(self.score_threshold),
                "--max-boxes", str(self.max_boxes),
                "--sent-ledger", f"{out_dir}/sent-{cfg.model_name}.jsonl",
                "--cache", f"{out_dir}/pool-cache"]
        if self.top_k:
            args += ["--top", str(self.top_k)]
        if self.candidate:
            args += ["--candidate", str(self.candidate)]
        labeled = [self.labeled] if isinstance(self.labeled, str) else list(self.labeled or ())
        for path in labeled:
            if path and storage.exists(str(path)):
                args += ["--labeled", str(path)]
        summary = self.run_child(args)
        self.log.info("%s: %s of %s scored images selected (skipped %s); tasks: %s",
                      summary["model_version"], summary["selected"], summary["scored"],
                      summary["skipped"], summary["files"][0])
        return {"out": summary["out"], "tasks": summary["files"][0],
                "selected": summary["selected"], "model_version": summary["model_version"],
                "came_back": summary.get("came_back")}
