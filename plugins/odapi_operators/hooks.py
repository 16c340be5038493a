"""Hooks: service addresses held in Airflow connections, handed out as clients.

TFServingHook: a TF Serving address, handed out as a client.

Connection (type `tf_serving`, default id `tf_serving_default`): host and port are the gRPC
address (port default 8500); extra `{"rest_url": "http://serving:8501", "timeout": 10}`.
With only a REST URL, leave host empty. E.g.
`AIRFLOW_CONN_TF_SERVING_DEFAULT='{"conn_type": "tf_serving", "host": "serving", "port": 8500}'`.

The connection types and their UI forms are registered by the provider entry point
(`provider.py`), as Airflow 3.2+ wants them: declared, not returned by the hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from odapi_operators.core.labeling.labelstudio_client import Address, LabelStudioClient
    from odapi_operators.core.serving.client import ServingClient
    from odapi_operators.core.serving.models_config import ServingOptions

DEFAULT_GRPC_PORT = 8500


class TFServingHook(BaseHook):
    """Builds a `ServingClient` (gRPC preferred, REST otherwise) from a connection."""

    conn_name_attr = "tf_serving_conn_id"
    default_conn_name = "tf_serving_default"
    conn_type = "tf_serving"
    hook_name = "TensorFlow Serving"

    def __init__(self, tf_serving_conn_id: str = default_conn_name, timeout: float = 10,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tf_serving_conn_id = tf_serving_conn_id
        self.timeout = timeout

    def addresses(self) -> dict[str, Any]:
        """{'grpc_address', 'rest_url', 'timeout'} from the connection (no client built)."""
        conn = self.get_connection(self.tf_serving_conn_id)
        extra = conn.extra_dejson
        grpc_address = f"{conn.host}:{conn.port or DEFAULT_GRPC_PORT}" if conn.host else None
        if not (grpc_address or extra.get("rest_url")):
            raise ValueError(f"connection {self.tf_serving_conn_id!r}: no host (gRPC) and no "
                             "rest_url in extra")
        return {"grpc_address": grpc_address, "rest_url": extra.get("rest_url"),
                "timeout": float(extra.get("timeout", self.timeout))}

    def get_client(self) -> ServingClient:
        from odapi_operators.core.serving.client import ServingClient

        found = self.addresses()
        return ServingClient(found["grpc_address"], found["rest_url"], found["timeout"])

    def get_conn(self) -> ServingClient:
        return self.get_client()



def serving_addresses(options: ServingOptions,
                      conn_id: str = TFServingHook.default_conn_name) -> dict[str, str]:
    """The Serving to confirm label moves with: the pipeline's `serving.grpc_address` /
    `rest_url` if set, else connection `conn_id` if it exists, else {} (no live check).

    Addresses, not a client: the check runs in the stage's child process, which keeps
    TensorFlow (the Serving protos import it) out of the worker."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    if options.grpc_address or options.rest_url:
        found = {"grpc_address": options.grpc_address, "rest_url": options.rest_url}
    else:
        try:
            found = TFServingHook(conn_id).addresses()
        except AirflowNotFoundException:
            return {}
        del found["timeout"]
    return {k: v for k, v in found.items() if v}


class LabelStudioHook(BaseHook):
    """A Label Studio URL and API token from a connection, handed out as a client.

    Connection (type `labelstudio`, default id `labelstudio_default`): host is the URL (or a
    host name with schema and port), password the API token (legacy or personal access). E.g.
    `AIRFLOW_CONN_LABELSTUDIO_DEFAULT='{"conn_type": "labelstudio",
    "host": "http://labelstudio:8080", "password": "<token>"}'`.
    """

    conn_name_attr = "labelstudio_conn_id"
    default_conn_name = "labelstudio_default"
    conn_type = "labelstudio"
    hook_name = "Label Studio"

    def __init__(self, labelstudio_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.labelstudio_conn_id = labelstudio_conn_id

    def address(self) -> Address:
        from odapi_operators.core.labeling.labelstudio_client import Address

        conn = self.get_connection(self.labelstudio_conn_id)
        host = (conn.host or "").rstrip("/")
        if not host or not conn.password:
            raise ValueError(f"connection {self.labelstudio_conn_id!r}: needs host (the Label "
                             "Studio URL) and password (its API token)")
        if "://" not in host:
            host = f"{conn.schema or 'http'}://{host}{f':{conn.port}' if conn.port else ''}"
        return Address(host, conn.password)

    def get_conn(self) -> LabelStudioClient:
        from odapi_operators.core.labeling.labelstudio_client import LabelStudioClient

        return LabelStudioClient(self.address())
