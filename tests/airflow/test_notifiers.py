"""Notifiers: a real HTTP server receives the webhook JSON, a real SMTP server the e-mail.

The end-to-end test runs a DAG with `dag.test()` whose task fails and whose gate says no, with
the notifiers `build_notifiers` makes from a `notify:` section hung on the task callbacks. The
webhook's URL comes from an Airflow connection (`AIRFLOW_CONN_*`), as in production. The
deadline alert's callback runs through Airflow's own `CallbackTrigger`, as the triggerer does.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from odapi_operators.notifiers import (
    DEFAULT_WEBHOOK_CONN,
    EVENTS,
    WebhookNotifier,
    build_notifiers,
    deadline_alerts,
)

from conftest import ROOT, free_port


class Webhook:
    """An HTTP server on 127.0.0.1 recording every POSTed JSON body; answers `statuses` first
    (one per request), 200 after that."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.bodies: list[dict] = []
        self.statuses = list(statuses)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def connect(monkeypatch: pytest.MonkeyPatch, url: str,
            conn_id: str = DEFAULT_WEBHOOK_CONN) -> None:
    """An `http` connection whose host is the webhook URL, as AIRFLOW_CONN_<ID>."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}",
                       json.dumps({"conn_type": "http", "host": url}))


@pytest.fixture
def webhook(monkeypatch):
    server = Webhook()
    connect(monkeypatch, server.url)
    yield server
    server.close()


@pytest.fixture
def mailbox(monkeypatch):
    """A local SMTP server (stdlib smtpd) behind connection `smtp_default`; the received mail."""
    import asyncore
    import smtpd

    received: list[email.message.EmailMessage] = []

    class Sink(smtpd.SMTPServer):
        def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
            message = email.message_from_bytes(data, policy=email.policy.default)
            message["X-Rcpt-To"] = ", ".join(rcpttos)
            received.append(message)

    server = Sink(("127.0.0.1", 0), None)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            asyncore.loop(timeout=0.05, count=1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": server.socket.getsockname()[1],
        "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "odapi@example.com",
                  "retry_limit": 0, "timeout": 10}}))
    yield received
    stop.set()
    thread.join()
    server.close()


DAG_FILE = textwrap.dedent("""
    from datetime import datetime

    from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
    from airflow.sdk import DAG

    from odapi_operators.notifiers import build_notifiers

    NOTIFY = {notify!r}
    GATE_REASON = "{{{{ ti.xcom_pull(task_ids='gate', key='reason') }}}}"


    def fail():
        raise RuntimeError("disk full")


    with DAG("notify_events", schedule=None, start_date=datetime(2026, 1, 1),
             default_args={{"on_failure_callback": build_notifiers(NOTIFY, "failure")}}) as dag:
        PythonOperator(task_id="train", python_callable=fail, retries=0)
        gate = PythonOperator(task_id="gate", multiple_outputs=True, python_callable=lambda: {{
            "promoted": False, "reason": "AP50 0.41 < 0.5"}})
        refused = ShortCircuitOperator(task_id="if_not_promoted", python_callable=lambda p: not p,
                                       op_args=[gate.output["promoted"]])
        refused >> PythonOperator(
            task_id="not_promoted", python_callable=lambda: None,
            on_success_callback=build_notifiers(NOTIFY, "not_promoted", reason=GATE_REASON))
""")


def test_a_dag_run_notifies_its_failure_and_the_gates_refusal(
        tmp_path, airflow_db, dag_bundle, webhook, mailbox):
    notify = {"webhook": {"events": ["failure", "not_promoted"]},
              "smtp": {"to": ["ml-team@example.com"], "events": ["failure", "not_promoted"]}}
    dag_file = dag_bundle / "notify_events.py"
    dag_file.write_text(DAG_FILE.format(notify=notify))
    import importlib.util

    spec = importlib.util.spec_from_file_location("notify_events", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_run = module.dag.test()
    assert str(dag_run.state) == "failed"  # train failed

    by_event = {body["event"]: body for body in webhook.bodies}
    assert sorted(by_event) == ["failure", "not_promoted"]
    failure = by_event["failure"]
    assert failure["dag_id"] == "notify_events" and failure["run_id"] == dag_run.run_id
    assert (failure["task_id"], failure["state"]) == ("train", "failed")
    assert failure["message"] == f"notify_events: task train failed in run {dag_run.run_id}"
    assert "disk full" in failure["error"]
    refusal = by_event["not_promoted"]
    assert (refusal["task_id"], refusal["reason"]) == ("not_promoted", "AP50 0.41 < 0.5")
    assert "did not promote" in refusal["message"]

    mails = {mail["Subject"]: mail for mail in mailbox}
    assert sorted(mails) == sorted(f"[odapi] {body['message']}" for body in webhook.bodies)
    failed = mails[f"[odapi] {failure['message']}"]
    assert failed["X-Rcpt-To"] == "ml-team@example.com" and failed["From"] == "odapi@example.com"
    assert "task train" in failed.get_body().get_content()
    refused_mail = mails[f"[odapi] {refusal['message']}"].get_body().get_content()
    assert "Reason: AP50 0.41 &lt; 0.5" in refused_mail  # escaped: text, not markup


def _context(**extra: object) -> dict:
    ti = SimpleNamespace(task_id="train", dag_id="odapi_retrain", state="failed")
    return {"run_id": "manual__1", "ti": ti, **extra}


def test_the_webhook_retries_server_errors(monkeypatch):
    server = Webhook(statuses=(503, 502))
    connect(monkeypatch, server.url)
    try:
        WebhookNotifier(event="failure", message="{{ run_id }} broke",
                        retries=2)(_context(exception=ValueError("bad shard")))
    finally:
        server.close()
    assert len(server.bodies) == 3
    assert server.bodies[-1] == {
        "event": "failure", "dag_id": "odapi_retrain", "run_id": "manual__1",
        "task_id": "train", "state": "failed", "message": "manual__1 broke",
        "text": "manual__1 broke", "error": "bad shard"}


@pytest.mark.parametrize("statuses", [(404,), (503, 503)], ids=["rejected", "still-failing"])
def test_an_undeliverable_webhook_never_raises(statuses, monkeypatch):
    server = Webhook(statuses=statuses)
    connect(monkeypatch, server.url)
    try:
        WebhookNotifier(event="failure", message="m", retries=1)(_context())
    finally:
        server.close()
    assert len(server.bodies) == len(statuses)  # a 4xx is not retried


def test_an_unreachable_webhook_never_raises_and_says_so(capfd, monkeypatch):
    port = free_port()
    connect(monkeypatch, f"http://127.0.0.1:{port}/nobody-listens")
    WebhookNotifier(event="failure", message="m", retries=0, timeout=2)(_context())
    logged = "".join(capfd.readouterr())
    assert f"webhook http://127.0.0.1:{port}/…: failure notification not delivered" in logged
    assert "Connection refused" in logged  # the reason stays, only the URL's secrets go


def test_a_missing_connection_is_logged_not_raised(capfd):
    WebhookNotifier(event="failure", message="m", http_conn_id="no_such_webhook")(_context())
    logged = "".join(capfd.readouterr())
    assert "no_such_webhook" in logged and "failure notification not delivered" in logged


# Every kind of secret a webhook URL carries: userinfo, a Slack-style path token
# (.../services/T../B../<token>) and query values, one of them quoted when requests sends it.
SECRETS = ("odapi-user", "pw-0f9e8d7c", "T0SECRET1", "B0SECRET2", "XsecretTokenX1234567890",
           "qs-4b3a2918", "sécrét-42", "s%C3%A9cr%C3%A9t-42")


def _secret_url(port: int) -> str:
    return (f"http://odapi-user:pw-0f9e8d7c@127.0.0.1:{port}/services/T0SECRET1/B0SECRET2/"
            f"XsecretTokenX1234567890?token=qs-4b3a2918&sig=sécrét-42&channel=ml")


def test_the_not_delivered_line_never_names_a_secret(capfd, caplog, monkeypatch):
    """Our own warning, even where no secrets masker runs: where and why, scrubbed."""
    port = free_port()
    connect(monkeypatch, _secret_url(port))
    caplog.set_level("INFO")
    WebhookNotifier(event="failure", message="m", retries=0, timeout=2)(_context())
    [line] = [line for line in ("".join(capfd.readouterr()) + caplog.text).splitlines()
              if "not delivered" in line]
    assert f"webhook http://127.0.0.1:{port}/…: failure notification not delivered" in line
    assert "Connection refused" in line
    assert [secret for secret in SECRETS if secret in line] == []


UNDELIVERED = textwrap.dedent("""
    import sys
    from types import SimpleNamespace

    from airflow.sdk.log import configure_logging

    configure_logging(output=sys.stderr)  # as Airflow's processes log: through the masker
    from odapi_operators.notifiers import WebhookNotifier

    ti = SimpleNamespace(task_id="train", dag_id="odapi_retrain", state="failed")
    for conn_id in sys.argv[1:]:
        WebhookNotifier(event="failure", message="m", retries=0, timeout=2,
                        http_conn_id=conn_id)({"run_id": "manual__1", "ti": ti})
""")


@pytest.mark.slow
def test_an_undelivered_webhook_never_logs_its_secrets():
    """A 500 (the HTTP hook logs the answer and raises) and a refused connection (the hook
    logs urllib3's error, which names the path and query), in a process logging as Airflow's
    do (~35 s on a loaded 2-core machine, mostly importing Airflow): every line, the hook's
    included, says where and why with none of the URL's secrets."""
    server, refused = Webhook(statuses=(500,)), free_port()
    conns = {f"AIRFLOW_CONN_HOOK_{port}": json.dumps({"conn_type": "http",
                                                      "host": _secret_url(port)})
             for port in (server.server.server_port, refused)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", UNDELIVERED, f"hook_{server.server.server_port}",
             f"hook_{refused}"], capture_output=True, text=True, timeout=180,
            env={**os.environ, **conns, "PYTHONPATH": str(ROOT / "plugins")})
    finally:
        server.close()
    logged = done.stdout + done.stderr
    assert done.returncode == 0, logged
    for port in (server.server.server_port, refused):
        assert f"webhook http://127.0.0.1:{port}/…: failure notification not delivered" in logged
    assert "500" in logged and "Connection refused" in logged
    assert "Tenacity will retry" in logged  # the hook's own line about the refused one
    assert [secret for secret in SECRETS if secret in logged] == []
    assert len(server.bodies) == 1  # it was delivered to the right place, and failed there


def test_the_webhooks_secrets_are_registered_with_airflows_masker(monkeypatch):
    """Whatever else logs the URL in the task (Airflow, a library) is masked too."""
    from airflow.sdk._shared.secrets_masker import redact

    url = _secret_url(free_port())
    connect(monkeypatch, url)
    WebhookNotifier(event="failure", message="m", retries=0, timeout=2)(_context())
    masked = redact(f"posting to {url}; token qs-4b3a2918, /services/T0SECRET1/B0SECRET2")
    assert [secret for secret in SECRETS if secret in masked] == []


def test_no_settings_no_notifiers():
    for event in set(EVENTS) - {"deadline"}:
        assert build_notifiers(None, event) == [] and build_notifiers({}, event) == []


def test_each_channel_gets_only_its_events():
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    notify = {"webhook": {"events": ["failure", "not_promoted"]},
              "smtp": {"to": "a@b.example", "events": ["failure"]}}
    assert [type(n) for n in build_notifiers(notify, "failure")] == [WebhookNotifier,
                                                                    SmtpNotifier]
    assert [type(n) for n in build_notifiers(notify, "not_promoted")] == [WebhookNotifier]
    assert build_notifiers(notify, "promoted") == []
    [webhook] = build_notifiers({"webhook": {"conn_id": "team_hook", "endpoint": "odapi"}},
                                "failure")  # events default to failures
    assert (webhook.http_conn_id, webhook.endpoint) == ("team_hook", "odapi")


@pytest.mark.parametrize("settings, event, named", [
    (None, "failed", "unknown task notification event 'failed'"),
    (None, "deadline", "unknown task notification event 'deadline'"),
    ({"slack": {"conn_id": "x"}}, "failure", "notify.slack"),
    ({"webhook": {"event": ["failure"]}}, "failure", "notify.webhook.event"),
    ({"webhook": {"events": ["failed"]}}, "failure", "notify.webhook.events.0"),
    ({"webhook": {"url": "https://x"}}, "failure", "notify.webhook: Value error, a webhook URL "
                                                   "carries secrets: put it in an Airflow "
                                                   "connection"),
    ({"smtp": {"events": ["failure"]}}, "failure", "notify.smtp.to"),
    ({"webhook": {}, "deadline_minutes": 60}, "failure", "no channel lists the `deadline`"),
    ({"webhook": {"events": ["deadline"]}, "deadline_minutes": 0}, "failure",
     "notify.deadline_minutes"),
])
def test_unknown_events_and_keys_are_refused(settings, event, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        build_notifiers(settings, event)


# --- the deadline ------------------------------------------------------------------------


def test_no_deadline_unless_configured():
    assert deadline_alerts(None) == []
    assert deadline_alerts({"webhook": {"events": ["failure", "deadline"]}}) == []


def test_the_deadline_alert_counts_from_queueing_and_calls_the_webhook_notifier():
    from airflow.sdk.definitions.deadline import DeadlineReference

    [alert] = deadline_alerts({"webhook": {"conn_id": "team_hook", "events": ["deadline"]},
                               "deadline_minutes": 90})
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert alert.interval.total_seconds() == 90 * 60
    assert alert.callback.path == "odapi_operators.notifiers.WebhookNotifier"
    kwargs = json.loads(json.dumps(alert.callback.kwargs))  # serialized with the DAG
    assert kwargs["event"] == "deadline" and kwargs["http_conn_id"] == "team_hook"


def test_odapi_retrain_carries_the_configured_deadline(tmp_path, monkeypatch, load_dag):
    """Parsed with notify.deadline_minutes, the DAG has the alert and serializes as the DAG
    processor stores it."""
    import yaml
    from airflow.serialization.serialized_objects import DagSerialization

    models = ROOT / "include" / "configs" / "models"
    config = {"home": str(tmp_path), "exports": {"path": "exports"},
              "train": {"model_config": str(models / "retinanet_mobile_sample.yaml"),
                        "steps": 5, "batch_size": 2},
              "serving": {"base": "serving", "model_name": "shapes"},
              "notify": {"webhook": {"events": ["failure", "deadline"]}, "deadline_minutes": 5}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(tmp_path / "pipeline.yaml"))
    dag = load_dag("odapi_retrain")
    [alert] = dag.deadline
    assert alert.interval.total_seconds() == 300
    serialized = json.dumps(DagSerialization.to_dict(dag))
    assert "odapi_operators.notifiers.WebhookNotifier" in serialized


def test_a_missed_deadline_posts_through_airflows_callback_trigger(webhook):
    """The alert's callback run the way the triggerer runs it (CallbackTrigger, with the
    context the scheduler adds when the deadline is missed) reaches the webhook."""
    import asyncio

    from airflow.triggers.callback import CallbackTrigger

    [alert] = deadline_alerts({"webhook": {"events": ["deadline"]}, "deadline_minutes": 1})
    context = {"dag_run": {"dag_id": "odapi_retrain", "dag_run_id": "scheduled__2026-12-01",
                           "state": "running"},
               "deadline": {"id": "d-1", "deadline_time": "2026-12-01T04:00:00+00:00"}}
    trigger = CallbackTrigger(alert.callback.path, {**alert.callback.kwargs, "context": context})

    async def events() -> list:
        return [event.payload async for event in trigger.run()]

    states = [str(payload["state"]) for payload in asyncio.run(events())]
    assert states[-1].endswith("success"), states
    [body] = webhook.bodies
    assert body["event"] == "deadline" and body["dag_id"] == "odapi_retrain"
    assert body["run_id"] == "scheduled__2026-12-01" and body["state"] == "running"
    assert body["message"] == ("odapi_retrain: run scheduled__2026-12-01 is still running past "
                               "its deadline (2026-12-01T04:00:00+00:00)")


def test_parse_time_imports_stay_light():
    probe = textwrap.dedent("""
        import json, sys
        import airflow.sdk
        from airflow.sdk import DAG, BaseOperator
        before = set(sys.modules)
        from odapi_operators.notifiers import build_notifiers, deadline_alerts
        build_notifiers(None, "failure")
        notify = {"webhook": {"events": ["failure", "deadline"]}, "deadline_minutes": 60}
        build_notifiers(notify, "failure")
        deadline_alerts(notify)
        new = set(sys.modules) - before
        print(json.dumps(sorted(m for m in new if m.split(".")[0] in ("requests", "urllib3")
                                or m.startswith("airflow.providers"))))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
