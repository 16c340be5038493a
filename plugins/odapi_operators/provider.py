"""odapi as an Airflow provider: what the `apache_airflow_provider` entry point hands Airflow.

A plugins-folder package cannot register connection types; a provider can. Installed with
`pip install -e .` (pyproject.toml's entry point), Airflow's ProvidersManager reads
`get_provider_info()`, and the connection forms of our hooks (`tf_serving`, `labelstudio`)
appear in the UI's connection editor. Airflow 3.2+ reads a form's field behaviour from here
(`ui-field-behaviour`) without importing the hook; hooks returning it are deprecated.
Imported by every Airflow component that lists providers: keep it free of imports.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "odapi"  # the distribution name in pyproject.toml: Airflow checks they match


def get_provider_info() -> dict[str, Any]:
    """Provider metadata in Airflow's runtime schema (airflow/provider_info.schema.json)."""
    return {
        "package-name": PACKAGE,
        "name": "odapi",
        "description": "Object detectors kept fresh: TF Serving and Label Studio connections "
                       "and the pipeline's notifiers.",
        "connection-types": [
            {"connection-type": "tf_serving", "hook-name": "TensorFlow Serving",
             "hook-class-name": "odapi_operators.hooks.TFServingHook",
             "ui-field-behaviour": {
                 "hidden-fields": ["schema", "login", "password"],
                 "relabeling": {"host": "gRPC host", "port": "gRPC port"},
                 "placeholders": {"port": "8500",  # hooks.DEFAULT_GRPC_PORT
                                  "extra": '{"rest_url": "http://serving:8501", "timeout": 10}'}}},
            {"connection-type": "labelstudio", "hook-name": "Label Studio",
             "hook-class-name": "odapi_operators.hooks.LabelStudioHook",
             "ui-field-behaviour": {
                 "hidden-fields": ["login", "extra"],
                 "relabeling": {"host": "URL", "password": "API token"},
                 "placeholders": {"host": "http://labelstudio:8080"}}},
        ],
        "notifications": ["odapi_operators.notifiers.WebhookNotifier"],
    }
