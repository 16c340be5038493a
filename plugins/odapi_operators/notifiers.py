"""Notifications about pipeline events: a JSON webhook and e-mail, off unless configured.

The pipeline YAML's `notify:` section says who hears about what:

    notify:
      webhook: {url: https://hooks.example.com/odapi, events: [failure, not_promoted]}
      smtp: {to: [ml-team@example.com], conn_id: smtp_default, events: [failure]}

`build_notifiers(section, event)` turns it into the notifiers for one event, to hang on a task
callback. A webhook URL with a secret in it belongs in an Airflow Variable, not in the YAML:
`url: "{{ var.value.odapi_webhook_url }}"` is rendered when the callback runs. Wherever it comes
from, the rendered URL's secrets (userinfo, query values, token path segments) never reach the
log: the notifier names the webhook as scheme://host/… and registers the secrets with Airflow's
secrets masker before sending. Events (all task callbacks):

    failure       on_failure_callback (e.g. in default_args): a task failed for good
    retry         on_retry_callback: a task failed and will be retried
    promoted      on_success_callback of the push task: a new version is `stable`
    not_promoted  on_success_callback of a task that runs only when the gate said no; pass the
                  gate's reason as a template, e.g.
                  reason="{{ ti.xcom_pull(task_ids='promote.gate', key='reason') }}"

Called at DAG parse time: nothing heavy is imported until a notification is sent (requests) or
e-mail is configured (the SMTP provider). A notification never fails the task it reports on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import unquote_plus, urlsplit

from airflow.sdk import BaseNotifier
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import requests
    from airflow.sdk import Context

Event = Literal["failure", "retry", "promoted", "not_promoted"]
EVENTS: tuple[str, ...] = get_args(Event)

MESSAGES: dict[str, str] = {
    "failure": "{{ dag.dag_id }}: task {{ ti.task_id }} failed in run {{ run_id }}",
    "retry": "{{ dag.dag_id }}: task {{ ti.task_id }} failed in run {{ run_id }} and will be "
             "retried",
    "promoted": "{{ dag.dag_id }}: run {{ run_id }} promoted a new model version",
    "not_promoted": "{{ dag.dag_id }}: run {{ run_id }} trained a candidate the gate did not "
                    "promote",
}
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Path segments after one of these are a webhook's credentials: Slack .../services/T../B../<token>,
# Discord .../api/webhooks/<id>/<token>, Mattermost .../hooks/<key>,
# Teams .../webhookb2/<guid>@<guid>/IncomingWebhook/<id>/<guid>.
SECRET_PATH_MARKERS = frozenset({"services", "webhooks", "hooks", "webhookb2"})
# Shorter parts (`channel=ml`) are not replaced on their own, as Airflow's masker does not mask
# them ([logging] min_length_masked_secret): replacing "ml" would garble "html" in a message.
MIN_SECRET_LENGTH = 5


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    events: list[Event] = ["failure"]


class WebhookSettings(_Channel):
    url: str = Field(pattern=r"^(https?://|\{\{)")  # or a template: "{{ var.value.x }}"
    timeout: float = Field(default=10.0, gt=0)  # seconds, per attempt
    retries: int = Field(default=3, ge=0)  # on connection errors and 429/5xx answers


class SmtpSettings(_Channel):
    to: str | list[str]
    conn_id: str = "smtp_default"
    from_email: str | None = None  # None: the connection's `from_email` extra


class NotifySettings(BaseModel):
    """The `notify:` section; a channel left out sends nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: WebhookSettings | None = None
    smtp: SmtpSettings | None = None


def redact_url(url: str) -> str:
    """`url` as it may be logged: scheme://host[:port]/… (no userinfo, path or query)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/…" if parts.scheme and host else "<webhook url>"


def _looks_like_token(segment: str) -> bool:
    return len(segment) >= 16 or (len(segment) >= 8 and any(c.isdigit() for c in segment))


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that are credentials, longest first, each as written, decoded and as
    requests quotes it: the URL itself, its path with query (urllib3's errors name that), the
    userinfo, every query value, and the path segments after a known webhook marker or that
    look like tokens; none shorter than MIN_SECRET_LENGTH."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    found = [url, parts.path + (f"?{parts.query}" if parts.query else ""),
             userinfo, *userinfo.split(":", 1)]
    found += [pair.partition("=")[2] for pair in parts.query.split("&")]
    after_marker = False
    for segment in filter(None, parts.path.split("/")):
        if after_marker or _looks_like_token(segment):
            found.append(segment)
        after_marker = after_marker or segment.lower() in SECRET_PATH_MARKERS
    from requests.utils import requote_uri  # the form requests sends, and its errors name

    found += [form(secret) for secret in found for form in (unquote_plus, requote_uri)]
    return sorted({secret for secret in found if len(secret) >= MIN_SECRET_LENGTH}, key=len,
                  reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (an error message) with every secret of `url` replaced: the URL by its redacted
    form, its path and query by /…, any other secret part by ***."""
    for secret in url_secrets(url):  # longest first: the URL before its parts
        text = text.replace(secret, redact_url(url) if "://" in secret
                            else "/…" if secret.startswith("/") else "***")
    return text


def _mask_in_airflow_logs(url: str) -> None:
    """Register the URL's secrets with Airflow's secrets masker (in the task process and its
    supervisor), so no other log line shows them either: e.g. urllib3's request line at DEBUG."""
    from airflow.sdk.log import mask_secret

    for secret in url_secrets(url):
        mask_secret(secret)


def _session(retries: int) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # Retry-After is not honoured: a server asking for an hour must not hold the callback.
    retry = Retry(total=retries, backoff_factor=0.5, status_forcelist=RETRY_STATUSES,
                  allowed_methods=frozenset({"POST"}), respect_retry_after_header=False,
                  raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _state(context: Context) -> str | None:
    holder = context.get("ti") or context.get("dag_run")
    state = getattr(holder, "state", None)
    return None if state is None else str(getattr(state, "value", state))


class WebhookNotifier(BaseNotifier):
    """POST one JSON message about a task event to `url`; retried, and if it still cannot be
    delivered, logged and dropped (Airflow also shields the task from any callback error).

    The body: event, dag_id, run_id, task_id, state, the rendered `message` (also as `text`,
    which Slack/Mattermost-style incoming webhooks display), `reason` if given, and the task's
    `error` if it raised.
    """

    template_fields = ("url", "message", "reason")

    def __init__(self, *, url: str, event: str, message: str, reason: str | None = None,
                 timeout: float = 10.0, retries: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.event = event
        self.message = message
        self.reason = reason
        self.timeout = timeout
        self.retries = retries

    def payload(self, context: Context) -> dict[str, Any]:
        ti, dag = context.get("ti"), context.get("dag")
        body = {"event": self.event,
                "dag_id": getattr(dag, "dag_id", None) or getattr(ti, "dag_id", None),
                "run_id": context.get("run_id"), "task_id": getattr(ti, "task_id", None),
                "state": _state(context), "message": self.message, "text": self.message}
        if self.reason is not None:
            body["reason"] = self.reason
        if context.get("exception") is not None:
            body["error"] = str(context["exception"])
        return body

    def notify(self, context: Context) -> None:
        import requests

        _mask_in_airflow_logs(self.url)
        try:
            with _session(self.retries) as session:
                response = session.post(self.url, json=self.payload(context),
                                        timeout=self.timeout)
                response.raise_for_status()
        except requests.RequestException as exc:  # reporting a failure must not become one
            # requests' and urllib3's messages name the URL, or its path and query
            self.log.warning("webhook %s: %s notification not delivered: %s",
                             redact_url(self.url), self.event, scrub(str(exc), self.url))


def _email(settings: SmtpSettings, message: str, reason: str | None) -> BaseNotifier:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    lines = (message, f"Reason: {reason}" if reason else None,
             "DAG {{ dag.dag_id }}, run {{ run_id }}, task {{ ti.task_id }}")
    # each line HTML-escaped once rendered ("AP50 0.41 < 0.5" is text, not markup)
    details = "".join(f"<p>{{% filter e %}}{line}{{% endfilter %}}</p>" for line in lines if line)
    return SmtpNotifier(to=settings.to, from_email=settings.from_email,
                        smtp_conn_id=settings.conn_id, subject=f"[odapi] {message}",
                        html_content=details)


def parse_settings(settings: dict | None) -> NotifySettings:
    """Validate a `notify:` section; ValueError naming each bad key (`notify.webhook.url`)."""
    try:
        return NotifySettings.model_validate(settings or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"notify.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors())
        raise ValueError(f"invalid notify settings: {problems}") from None


def build_notifiers(settings: dict | None, event: str, *,
                    reason: str | None = None) -> list[BaseNotifier]:
    """The notifiers `settings` (the `notify:` section) asks for on `event`; [] if none.

    `reason` (a template, rendered when the callback runs) is added to the message, e.g. the
    gate's reason for `not_promoted`. Unknown events, channels or keys raise ValueError.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r} (known: {', '.join(EVENTS)})")
    config = parse_settings(settings)
    message = MESSAGES[event]
    notifiers: list[BaseNotifier] = []
    if config.webhook and event in config.webhook.events:
        notifiers.append(WebhookNotifier(url=config.webhook.url, event=event, message=message,
                                         reason=reason, timeout=config.webhook.timeout,
                                         retries=config.webhook.retries))
    if config.smtp and event in config.smtp.events:
        notifiers.append(_email(config.smtp, message, reason))
    return notifiers
