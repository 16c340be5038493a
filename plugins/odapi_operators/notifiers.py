"""Notifications about pipeline events through Airflow's providers, off unless configured.

The pipeline YAML's `notify:` section says who hears about what:

    notify:
      webhook: {conn_id: odapi_webhook, events: [failure, not_promoted, deadline]}
      smtp: {to: [ml-team@example.com], conn_id: smtp_default, events: [failure]}
      deadline_minutes: 240   # a run still going 240 min after it was queued: `deadline`

The webhook is the HTTP provider's `HttpNotifier` on an Airflow connection (type `http`; host
= the webhook URL, or a base URL plus `endpoint`; login/password or extra headers for auth),
so the URL and its secrets live in the connection, never in the YAML or a Variable; e-mail is
the SMTP provider's `SmtpNotifier`. `build_notifiers(section, event)` turns the section into
the notifiers for one task event, to hang on a task callback; `deadline_alerts(section)` into
the DAG's `DeadlineAlert`s, whose callback runs the same webhook notifier in the triggerer.

An undelivered notification never logs its secrets: before sending, every secret of the
resolved URL (userinfo, query values, token path segments) is registered with Airflow's
secrets masker (what the task's and the triggerer's logs go through, the HTTP hook's own
lines included), and the notifier's own warning names the webhook as scheme://host/… with the
error scrubbed. Events:

    failure       on_failure_callback (e.g. in default_args): a task failed for good
    retry         on_retry_callback: a task failed and will be retried
    promoted      on_success_callback of the push task: a new version is `stable`
    not_promoted  on_success_callback of a task that runs only when the gate said no; pass the
                  gate's reason as a template, e.g.
                  reason="{{ ti.xcom_pull(task_ids='promote.gate', key='reason') }}"
    deadline      the DAG's DeadlineAlert: a run passed `deadline_minutes` and is still going

Called at DAG parse time: nothing heavy is imported until a notification is sent (the HTTP
provider pulls in requests and aiohttp) or e-mail is configured (the SMTP provider). A
notification never fails the task it reports on.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import unquote_plus, urlsplit

from airflow.sdk import BaseNotifier
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from airflow.providers.http.notifications.http import HttpNotifier
    from airflow.sdk import Context
    from airflow.sdk.definitions.deadline import DeadlineAlert

Event = Literal["failure", "retry", "promoted", "not_promoted", "deadline"]
EVENTS: tuple[str, ...] = get_args(Event)

MESSAGES: dict[str, str] = {
    "failure": "{{ dag.dag_id }}: task {{ ti.task_id }} failed in run {{ run_id }}",
    "retry": "{{ dag.dag_id }}: task {{ ti.task_id }} failed in run {{ run_id }} and will be "
             "retried",
    "promoted": "{{ dag.dag_id }}: run {{ run_id }} promoted a new model version",
    "not_promoted": "{{ dag.dag_id }}: run {{ run_id }} trained a candidate the gate did not "
                    "promote",
    # a deadline's callback runs in the triggerer with a smaller context: the run as the REST
    # API shows it (`dag_run`) and the deadline
    "deadline": "{{ dag_run.dag_id }}: run {{ dag_run.dag_run_id }} is still running past its "
                "deadline ({{ deadline.deadline_time }})",
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


DEFAULT_WEBHOOK_CONN = "odapi_webhook"


class WebhookSettings(_Channel):
    conn_id: str = DEFAULT_WEBHOOK_CONN  # an `http` connection: host = the webhook URL
    endpoint: str | None = None  # appended to the connection's URL
    timeout: float = Field(default=10.0, gt=0)  # seconds, per attempt
    retries: int = Field(default=3, ge=0)  # on connection errors and 429/5xx answers

    @model_validator(mode="before")
    @classmethod
    def _no_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" in data:
            raise ValueError("a webhook URL carries secrets: put it in an Airflow connection "
                             "(conn_type http, host = the URL) and name that connection in "
                             "notify.webhook.conn_id")
        return data


class SmtpSettings(_Channel):
    to: str | list[str]
    conn_id: str = "smtp_default"
    from_email: str | None = None  # None: the connection's `from_email` extra


class NotifySettings(BaseModel):
    """The `notify:` section; a channel left out sends nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: WebhookSettings | None = None
    smtp: SmtpSettings | None = None
    deadline_minutes: float | None = Field(default=None, gt=0)  # None: no deadline

    @model_validator(mode="after")
    def _someone_hears_the_deadline(self) -> NotifySettings:
        if self.deadline_minutes is not None and not (
                self.webhook and "deadline" in self.webhook.events):
            raise ValueError("deadline_minutes is set but no channel lists the `deadline` "
                             "event (notify.webhook.events)")
        return self


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


def _state(context: Context) -> str | None:
    holder = context.get("ti") or context.get("dag_run")
    state = holder.get("state") if isinstance(holder, dict) else getattr(holder, "state", None)
    return None if state is None else str(getattr(state, "value", state))


def _join(base_url: str, endpoint: str | None) -> str:
    if not endpoint:
        return base_url
    return f"{base_url.rstrip('/')}/{endpoint.lstrip('/')}"


def _transient(exc: BaseException) -> bool:
    """A connection error, a timeout or a 429/5xx answer (the HTTP hook raises those as
    `AirflowException("<status>:<reason>")`): worth another attempt."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    return str(exc).split(":", 1)[0] in {str(status) for status in RETRY_STATUSES}


class WebhookNotifier(BaseNotifier):
    """POST one JSON message about a pipeline event through the HTTP provider's `HttpNotifier`
    (connection `http_conn_id`); retried, and if it still cannot be delivered, logged with the
    URL's secrets scrubbed and dropped.

    The body: event, dag_id, run_id, task_id, state, the rendered `message` (also as `text`,
    which Slack/Mattermost-style incoming webhooks display), `reason` if given, and the task's
    `error` if it raised. Runs in a task's callback (`notify`) and, as a DeadlineAlert's
    `AsyncCallback`, in the triggerer (`async_notify`).
    """

    template_fields = ("http_conn_id", "endpoint", "message", "reason")

    def __init__(self, *, event: str, message: str, reason: str | None = None,
                 http_conn_id: str = DEFAULT_WEBHOOK_CONN, endpoint: str | None = None,
                 timeout: float = 10.0, retries: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.event = event
        self.message = message
        self.reason = reason
        self.http_conn_id = http_conn_id
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries

    def payload(self, context: Context) -> dict[str, Any]:
        ti, dag, run = context.get("ti"), context.get("dag"), context.get("dag_run")
        run = run if isinstance(run, dict) else {}  # a deadline's context: the run as JSON
        body = {"event": self.event,
                "dag_id": (getattr(dag, "dag_id", None) or getattr(ti, "dag_id", None)
                           or run.get("dag_id")),
                "run_id": context.get("run_id") or run.get("dag_run_id"),
                "task_id": getattr(ti, "task_id", None), "state": _state(context),
                "message": self.message, "text": self.message}
        if self.reason is not None:
            body["reason"] = self.reason
        if context.get("exception") is not None:
            body["error"] = str(context["exception"])
        return body

    def _provider_notifier(self, context: Context, timeout: Any) -> HttpNotifier:
        from airflow.providers.http.notifications.http import HttpNotifier

        return HttpNotifier(http_conn_id=self.http_conn_id, endpoint=self.endpoint,
                            json=self.payload(context), extra_options={"timeout": timeout})

    def _not_delivered(self, url: str, exc: BaseException) -> None:
        self.log.warning("webhook %s: %s notification not delivered: %s", redact_url(url),
                         self.event, scrub(str(exc), url))

    def notify(self, context: Context) -> None:
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

        notifier = self._provider_notifier(context, self.timeout)
        url = f"http_conn_id={self.http_conn_id}"
        try:
            url = notifier.hook.url_from_endpoint(self.endpoint)  # reads the connection
            _mask_in_airflow_logs(url)
            # Retry-After is not honoured: a server asking for an hour must not hold the task.
            for attempt in Retrying(stop=stop_after_attempt(self.retries + 1),
                                    wait=wait_exponential(multiplier=0.5, max=8),
                                    retry=retry_if_exception(_transient), reraise=True):
                with attempt:
                    notifier.notify(context)
        except Exception as exc:  # reporting a failure must not become one
            self._not_delivered(url, exc)

    async def async_notify(self, context: Context) -> None:
        import aiohttp

        notifier = self._provider_notifier(context, aiohttp.ClientTimeout(total=self.timeout))
        url = f"http_conn_id={self.http_conn_id}"
        try:
            url = _join((await notifier.async_hook.config()).base_url, self.endpoint)
            from airflow.sdk.log import amask_secret  # not mask_secret: no sync send in a loop

            for secret in url_secrets(url):
                await amask_secret(secret)
            notifier.async_hook.retry_limit = self.retries + 1
            await notifier.async_notify(context)
        except Exception as exc:
            self._not_delivered(url, exc)


def _webhook_kwargs(settings: WebhookSettings, event: str, message: str,
                    reason: str | None) -> dict[str, Any]:
    """The notifier's keywords: also a DeadlineAlert callback's, so JSON only."""
    return {"event": event, "message": message, "reason": reason,
            "http_conn_id": settings.conn_id, "endpoint": settings.endpoint,
            "timeout": settings.timeout, "retries": settings.retries}


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
    if event not in EVENTS or event == "deadline":
        raise ValueError(f"unknown task notification event {event!r} (known: "
                         f"{', '.join(e for e in EVENTS if e != 'deadline')}; `deadline` is "
                         "the DAG's, see deadline_alerts)")
    config = parse_settings(settings)
    message = MESSAGES[event]
    notifiers: list[BaseNotifier] = []
    if config.webhook and event in config.webhook.events:
        notifiers.append(WebhookNotifier(**_webhook_kwargs(config.webhook, event, message,
                                                           reason)))
    if config.smtp and event in config.smtp.events:
        notifiers.append(_email(config.smtp, message, reason))
    return notifiers


def deadline_alerts(settings: dict | None) -> list[DeadlineAlert]:
    """The DAG's `deadline`: with `deadline_minutes` set, one `DeadlineAlert` measured from
    when a run was queued, whose callback (in the triggerer) is the webhook notifier; [] when
    unset. A run that ends in time has its deadline dropped by Airflow."""
    config = parse_settings(settings)
    if config.deadline_minutes is None or config.webhook is None:
        return []
    from airflow.sdk.definitions.callback import AsyncCallback
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    callback = AsyncCallback(WebhookNotifier, kwargs=_webhook_kwargs(
        config.webhook, "deadline", MESSAGES["deadline"], reason=None))
    return [DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, callback=callback,
                          interval=timedelta(minutes=config.deadline_minutes),
                          name="odapi_run_deadline")]
