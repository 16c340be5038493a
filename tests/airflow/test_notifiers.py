"""Notifiers: a real HTTP server receives the webhook JSON, a real SMTP server the e-mail.

The end-to-end test runs a DAG with `dag.test()` whose task fails and whose gate says no, with
the notifiers `build_notifiers` makes from a `notify:` section hung on the task callbacks.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from odapi_operators.notifiers import EVENTS, WebhookNotifier, build_notifiers

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


@pytest.fixture
def webhook():
    server = Webhook()
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
    notify = {"webhook": {"url": webhook.url, "events": ["failure", "not_promoted"]},
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


def test_the_webhook_retries_server_errors():
    server = Webhook(statuses=(503, 502))
    try:
        WebhookNotifier(url=server.url, event="failure", message="{{ run_id }} broke",
                        retries=2)(_context(exception=ValueError("bad shard")))
    finally:
        server.close()
    assert len(server.bodies) == 3
    assert server.bodies[-1] == {
        "event": "failure", "dag_id": "odapi_retrain", "run_id": "manual__1",
        "task_id": "train", "state": "failed", "message": "manual__1 broke",
        "text": "manual__1 broke", "error": "bad shard"}


@pytest.mark.parametrize("statuses", [(404,), (503, 503)], ids=["rejected", "still-failing"])
def test_an_undeliverable_webhook_never_raises(statuses):
    server = Webhook(statuses=statuses)
    try:
        WebhookNotifier(url=server.url, event="failure", message="m", retries=1)(_context())
    finally:
        server.close()
    assert len(server.bodies) == len(statuses)  # a 4xx is not retried


def test_an_unreachable_webhook_never_raises_and_says_so(capfd):
    port = free_port()
    url = f"http://127.0.0.1:{port}/nobody-listens"
    WebhookNotifier(url=url, event="failure", message="m", retries=0, timeout=2)(_context())
    logged = "".join(capfd.readouterr())
    assert f"webhook http://127.0.0.1:{port}/…: failure notification not delivered" in logged
    assert "Connection refused" in logged  # the reason stays, only the URL's secrets go


# Every kind of secret a webhook URL carries: userinfo, a Slack-style path token
# (.../services/T../B../<token>) and query values, one of them quoted when requests sends it.
SECRETS = ("odapi-user", "pw-0f9e8d7c", "T0SECRET1", "B0SECRET2", "XsecretTokenX1234567890",
           "qs-4b3a2918", "sécrét-42", "s%C3%A9cr%C3%A9t-42")


def _secret_url(port: int) -> str:
    return (f"http://odapi-user:pw-0f9e8d7c@127.0.0.1:{port}/services/T0SECRET1/B0SECRET2/"
            f"XsecretTokenX1234567890?token=qs-4b3a2918&sig=sécrét-42&channel=ml")


@pytest.mark.parametrize("answer", ["server-error", "refused"])
def test_an_undelivered_webhook_never_logs_its_secrets(answer, capfd, caplog):
    """A 500 (requests' HTTPError names the URL) and a refused connection (urllib3's error
    names the path and query): the log says where and why, with none of the URL's secrets."""
    server = Webhook(statuses=(500,)) if answer == "server-error" else None
    port = server.server.server_port if server else free_port()
    caplog.set_level("INFO")  # a task logs at INFO; DEBUG lines go through the masker
    try:
        WebhookNotifier(url=_secret_url(port), event="failure", message="m", retries=0,
                        timeout=2)(_context())
    finally:
        if server:
            server.close()
    logged = "".join(capfd.readouterr()) + caplog.text
    assert f"webhook http://127.0.0.1:{port}/…: failure notification not delivered" in logged
    assert ("500" if server else "Connection refused") in logged
    assert [secret for secret in SECRETS if secret in logged] == []
    if server:
        assert len(server.bodies) == 1  # it was delivered to the right place, and failed there


def test_the_webhooks_secrets_are_registered_with_airflows_masker():
    """Whatever else logs the URL in the task (Airflow, a library) is masked too."""
    from airflow.sdk._shared.secrets_masker import redact

    url = _secret_url(free_port())
    WebhookNotifier(url=url, event="failure", message="m", retries=0, timeout=2)(_context())
    masked = redact(f"posting to {url}; token qs-4b3a2918, /services/T0SECRET1/B0SECRET2")
    assert [secret for secret in SECRETS if secret in masked] == []


def test_no_settings_no_notifiers():
    for event in EVENTS:
        assert build_notifiers(None, event) == [] and build_notifiers({}, event) == []


def test_each_channel_gets_only_its_events():
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    notify = {"webhook": {"url": "https://hooks.example.com/x",
                          "events": ["failure", "not_promoted"]},
              "smtp": {"to": "a@b.example", "events": ["failure"]}}
    assert [type(n) for n in build_notifiers(notify, "failure")] == [WebhookNotifier,
                                                                    SmtpNotifier]
    assert [type(n) for n in build_notifiers(notify, "not_promoted")] == [WebhookNotifier]
    assert build_notifiers(notify, "promoted") == []
    assert [type(n) for n in build_notifiers({"webhook": {"url": "http://h/x"}}, "failure")] \
        == [WebhookNotifier]  # events default to failures
    secret = "{{ var.value.odapi_webhook_url }}"  # rendered when the callback runs
    assert build_notifiers({"webhook": {"url": secret}}, "failure")[0].url == secret


@pytest.mark.parametrize("settings, event, named", [
    (None, "failed", "unknown notification event 'failed'"),
    ({"slack": {"url": "https://x"}}, "failure", "notify.slack"),
    ({"webhook": {"url": "https://x", "event": ["failure"]}}, "failure", "notify.webhook.event"),
    ({"webhook": {"url": "https://x", "events": ["failed"]}}, "failure", "notify.webhook.events.0"),
    ({"webhook": {"url": "ftp://x"}}, "failure", "notify.webhook.url"),
    ({"smtp": {"events": ["failure"]}}, "failure", "notify.smtp.to"),
])
def test_unknown_events_and_keys_are_refused(settings, event, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        build_notifiers(settings, event)


def test_parse_time_imports_stay_light():
    probe = textwrap.dedent("""
        import json, sys
        import airflow.sdk
        from airflow.sdk import DAG, BaseOperator
        before = set(sys.modules)
        from odapi_operators.notifiers import build_notifiers
        build_notifiers(None, "failure")
        build_notifiers({"webhook": {"url": "https://hooks.example.com/x"}}, "failure")
        new = set(sys.modules) - before
        print(json.dumps(sorted(m for m in new if m.split(".")[0] in ("requests", "urllib3")
                                or m.startswith("airflow.providers"))))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
