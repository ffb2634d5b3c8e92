"""The middleware's options, defined once: `Settings` lists each with its type, default, environment variable,
concern and description. The middleware's arguments, the environment reading and the documented table come
from it (`mlflow-feedback options` prints the table; a test compares it with docs/configuration.md).
Settings are validated once, at construction, so bad ones fail at start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal

from starlette.requests import HTTPConnection

from . import env_config as env
from .intake.identity import AuthenticatedUserOrHeader, IdentityResolver, resolve_user
from .intake.limits import FeedbackLimits, RateLimit
from .intake.schema import FeedbackSchema
from .intake.scrubbing import Scrubber, scrub_personal_data
from .intake.tokens import as_secret_list
from .redaction import normalise_field, redact

# Requests that are not answers a user could rate: API docs, browsers' icon probes and health checks.
# Tracing them would only dilute the feedback rate. Passing `exclude_paths` replaces this list.
DEFAULT_EXCLUDE_PATHS: tuple[str, ...] = (
    r"^/(docs|redoc)(/|$)",
    r"^/openapi\.json$",
    r"^/favicon\.ico$",
    r"^/(health|healthz|livez|readyz|ready|metrics)$",
)


# Request and response fields whose values never reach a trace (compared case-insensitively, '-' as '_').
DEFAULT_REDACT_FIELDS: tuple[str, ...] = (
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "feedback_token",
    "api_key",
    "apikey",
    "access_key",
    "authorization",
    "cookie",
    "credentials",
    "private_key",
)

# Relative to the working directory, so the workers of one service share it. MLFLOW_FEEDBACK_OUTBOX overrides.
DEFAULT_OUTBOX_PATH = ".mlflow-feedback/outbox.db"


class Unset:
    """The default of every `MlflowFeedbackMiddleware` argument: "not given here". An argument left unset takes
    its ``MLFLOW_FEEDBACK_<NAME>`` variable when that is set, else the option's default; an argument given in
    code, even equal to the default, always wins."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = Unset()

# The concerns options are grouped by, in the documentation's order.
GROUPS = (
    "Where traces go",
    "What is traced",
    "IDs on the wire",
    "Feedback routes",
    "Who may give feedback",
    "Delivery",
)


def _option(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    group: str,
    doc: str,
    parse: Callable[[str], Any] | None,
    shown: str | None = None,
    variables: Sequence[str] = (),
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """One option: its default, the concern it belongs to, its documented description, how its environment variable
    is read (None: it has none), the default as the documentation shows it, the variables read (by default
    ``MLFLOW_FEEDBACK_<NAME>``), and how a value given in code or the environment becomes the setting."""
    assert group in GROUPS
    metadata = {"group": group, "doc": doc, "parse": parse, "shown": shown, "variables": variables, "convert": convert}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _outbox(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _schema(value: FeedbackSchema | str | os.PathLike[str] | None) -> FeedbackSchema | None:
    return value if value is None or isinstance(value, FeedbackSchema) else FeedbackSchema.load(value)


def _secrets(value: str | bytes | Sequence[str | bytes] | None) -> tuple[bytes, ...]:
    return () if value is None else tuple(as_secret_list(value))


def _limits(value: FeedbackLimits | None) -> FeedbackLimits:
    return value if value is not None else FeedbackLimits()


@dataclass(frozen=True)
class Settings:
    """Everything `MlflowFeedbackMiddleware` accepts, validated. Build it with `Settings.from_arguments`."""

    # Where traces go
    experiment_name: str | None = _option(
        None,
        group="Where traces go",
        parse=str,
        shown="`MLFLOW_EXPERIMENT_NAME`, else `MLFLOW_EXPERIMENT_ID`, else MLflow's default experiment",
        doc="Experiment the traces go to; created if missing.",
    )
    tracking_uri: str | None = _option(
        None,
        group="Where traces go",
        parse=str,
        shown="`MLFLOW_TRACKING_URI`, else MLflow's default",
        doc="Tracking server. MLflow keeps one per process: setting it sets it for the whole process.",
    )
    export: Literal["mlflow", "otlp"] = _option(
        "mlflow",
        group="Where traces go",
        parse=str,
        doc="`\"mlflow\"`: MLflow's own exporter, storing everything MLflow's client stores, with its per-trace call"
        " made cheaper and a trace's info sent before its spans (half the tracking server's work, see"
        ' [Capacity planning](../benchmarks/README.md#capacity-planning)). `"otlp"`: MLflow\'s batched OTLP'
        " exporter to the tracking server's `/v1/traces`, three times cheaper again in the app and five times on"
        " the server, without the `client_request_id` column and handler-set metadata.",
    )
    mlflow_threads: int = _option(
        8,
        group="Where traces go",
        parse=int,
        doc="Threads of the middleware's own pool for its MLflow calls at start-up and shutdown (resolving the"
        " experiment, flushing); never the event loop, never the app's threadpool. Feedback is written by one"
        " delivery thread of its own.",
    )
    startup_timeout_seconds: float = _option(
        10.0,
        group="Where traces go",
        parse=float,
        doc="How long start-up (or the first requests) waits for the tracking server.",
    )
    shutdown_timeout_seconds: float = _option(
        10.0,
        group="Where traces go",
        parse=float,
        doc="At lifespan shutdown, how long to wait for MLflow to export the traces it still holds.",
    )
    # What is traced
    exclude_paths: tuple[str, ...] = _option(
        DEFAULT_EXCLUDE_PATHS,
        group="What is traced",
        parse=env.json_list,
        shown="`DEFAULT_EXCLUDE_PATHS`",
        convert=lambda value: _strings("exclude_paths", value, "a list of regular expressions"),
        doc="Regexes (`re.search` on the path) of requests that get no trace. The default excludes `/docs`,"
        " `/redoc`, `/openapi.json`, `/favicon.ico` and `/health`, `/healthz`, `/livez`, `/readyz`, `/ready`,"
        " `/metrics`; a list you pass replaces it (extend it with `[*DEFAULT_EXCLUDE_PATHS, ...]`).",
    )
    capture_request_body: bool = _option(
        True,
        group="What is traced",
        parse=env.boolean,
        doc="Record JSON and text request bodies as the trace's inputs.",
    )
    capture_response_body: bool = _option(
        True,
        group="What is traced",
        parse=env.boolean,
        doc="Record JSON and text response bodies as the trace's outputs.",
    )
    max_capture_bytes: int = _option(
        64 * 1024,
        group="What is traced",
        parse=int,
        doc="Cap on each captured body; past it the text is cut and marked.",
    )
    redact_fields: tuple[str, ...] = _option(
        DEFAULT_REDACT_FIELDS,
        group="What is traced",
        parse=env.words,
        shown="`DEFAULT_REDACT_FIELDS`",
        convert=lambda value: _strings("redact_fields", value, "a list of field names"),
        doc='JSON fields and query parameters whose values are replaced by `"[REDACTED]"` in captured'
        " inputs/outputs, at any depth (case-insensitive; `-` = `_`): `password`, `passwd`, `secret`,"
        " `client_secret`, `token`, `access_token`, `refresh_token`, `id_token`, `feedback_token`, `api_key`,"
        " `apikey`, `access_key`, `authorization`, `cookie`, `credentials`, `private_key`, and any snake_case"
        " name ending in one (`openai_api_key`, `x-api-key`, `session_token`; `max_tokens` stays); `key: value`"
        " and `key=value` pairs in text bodies too. Passing a list replaces it (add `*DEFAULT_REDACT_FIELDS`).",
    )
    # IDs on the wire
    trace_id_header: str = _option(
        "X-MLflow-Trace-Id", group="IDs on the wire", parse=str, doc="Response header with the trace ID."
    )
    request_id_header: str = _option(
        "X-Request-ID",
        group="IDs on the wire",
        parse=str,
        doc="Request/response header with the client request ID.",
    )
    user_id_header: str = _option(
        "X-User-ID",
        group="IDs on the wire",
        parse=str,
        doc="Request header naming the end user (trace metadata, feedback source) when no authenticated user is"
        " known; see [Security](security.md#security).",
    )
    session_id_header: str = _option(
        "X-Session-ID",
        group="IDs on the wire",
        parse=str,
        doc="Request header naming the session (trace metadata).",
    )
    sse_final_event: bool | None = _option(
        None,
        group="IDs on the wire",
        parse=env.auto_boolean,
        shown="`None` (auto)",
        doc="In-band trace event for `text/event-stream` responses: `None` adds the `mlflow_trace` event only to"
        " streams in no recognised LLM wire format; `True` always; `False` never (not even when a client asks). See"
        " [Streams](streaming.md#streams-sse).",
    )
    sse_event_name: str = _option("mlflow_trace", group="IDs on the wire", parse=str, doc="The name of that event.")
    trust_traceparent: bool = _option(
        False,
        group="IDs on the wire",
        parse=env.boolean,
        doc="Continue callers' W3C `traceparent` traces instead of linking them; only behind callers you trust,"
        " in the same experiment. See [Distributed traces](distributed-tracing.md#distributed-traces-traceparent).",
    )
    # Feedback routes
    feedback_path: str | None = _option(
        "/feedback",
        group="Feedback routes",
        parse=env.optional(str),
        doc="Where the feedback routes are mounted; `None` mounts none.",
    )
    max_feedback_body_bytes: int = _option(
        64 * 1024, group="Feedback routes", parse=int, doc="Larger feedback bodies get `413`."
    )
    feedback_schema: FeedbackSchema | None = _option(
        None,
        group="Feedback routes",
        parse=env.optional(str),
        shown="none",
        convert=_schema,
        doc="A `FeedbackSchema`, or the path of a TOML/JSON file: what feedback the route takes; see"
        " [Feedback schemas](feedback-api.md#feedback-schemas).",
    )
    rating_scale: tuple[float, float] = _option(
        (1, 5),
        group="Feedback routes",
        parse=env.pair,
        doc="Range of `ratings`; each is stored divided by the maximum.",
    )
    feedback_limits: FeedbackLimits = _option(
        factory=FeedbackLimits,
        group="Feedback routes",
        parse=env.limits,
        shown="`FeedbackLimits()`",
        convert=_limits,
        doc="Caps: `max_text_chars` 5000 (comment, rationale, string value), `max_metadata_entries` 20,"
        " `max_metadata_bytes` 4096, `max_ratings` 20, `max_value_bytes` 4096 (list/object values).",
    )
    rate_limit: RateLimit | None = _option(
        factory=RateLimit,
        group="Feedback routes",
        parse=env.optional(env.rate_limit),
        shown="`RateLimit(per_second=5, burst=50)`",
        doc="Token bucket per client on the feedback routes (writes and reads have one each); `429` with"
        " `Retry-After`. The client is the request's valid feedback token (one bucket per answer; a made-up token"
        " counts for nothing), else the user `AuthenticationMiddleware` authenticated, else the IP address, read"
        ' from `X-Forwarded-For` only when the peer is one of `RateLimit(trusted_proxies=["10.0.0.0/8", …])`;'
        " `key=callable(HTTPConnection) -> str` replaces all that. `None` turns it off.",
    )
    comment_scrubber: Scrubber | None = _option(
        scrub_personal_data,
        group="Feedback routes",
        parse=env.optional(env.imported),
        shown="`scrub_personal_data`",
        doc="`callable(str) -> str` applied to comments, rationales and free-text values before they are stored (a"
        " `module:function` in the variable): by default email addresses, phone numbers, card numbers and API-key"
        " shapes become `[email]`, `[phone]`, `[card]`, `[secret]`, and the kinds found are noted in the"
        " assessment's metadata. `None` stores text as sent.",
    )
    summary_token: str | None = _option(
        None,
        group="Feedback routes",
        parse=str,
        shown="none",
        doc="Enables `GET {feedback_path}/summary` (the report as JSON, for dashboards) for requests with"
        " `Authorization: Bearer <token>` (≥ 16 characters); without it the route does not exist.",
    )
    # Who may give feedback
    feedback_secret: tuple[bytes, ...] = _option(
        (),
        group="Who may give feedback",
        parse=env.secrets,
        shown="none",
        variables=("MLFLOW_FEEDBACK_SECRET",),  # and MLFLOW_FEEDBACK_PREVIOUS_SECRET, read with it
        convert=_secrets,
        doc="Secret (≥ 16 bytes) for signed feedback tokens, or a list: the first signs, all verify (key"
        " rotation). Without one the feedback route is unauthenticated (a start-up warning says so). See"
        " [Security](security.md#security).",
    )
    feedback_token_ttl_seconds: float = _option(
        24 * 3600, group="Who may give feedback", parse=float, doc="How long a feedback token stays valid."
    )
    feedback_token_header: str = _option(
        "X-MLflow-Feedback-Token",
        group="Who may give feedback",
        parse=str,
        doc="Response header carrying the token, and request header the feedback route reads it from.",
    )
    identity: IdentityResolver | None = _option(
        None,
        group="Who may give feedback",
        parse=env.optional(env.imported),
        shown="`AuthenticatedUserOrHeader(user_id_header)`",
        doc="`callable(HTTPConnection) -> str | None` naming the end user of a request (a `module:function` in"
        " the variable): by default `request.user` when authenticated, else the `X-User-ID` header.",
    )
    # Delivery
    feedback_sync_seconds: float = _option(
        1.0,
        group="Delivery",
        parse=float,
        doc="How long `POST /feedback` waits for the write before answering `202 Accepted` (the feedback is then"
        " delivered from the outbox).",
    )
    feedback_wait_seconds: float = _option(
        15.0,
        group="Delivery",
        parse=float,
        doc="How long feedback for an ID this process did not issue waits, in the request, for MLflow to have the"
        " trace before answering `404`.",
    )
    trace_wait_seconds: float = _option(
        300.0,
        group="Delivery",
        parse=float,
        doc="How long queued feedback for a trace this service issued waits for MLflow to export it (counted from"
        " the end of the answer) before it is marked failed.",
    )
    outbox_path: str | None = _option(
        DEFAULT_OUTBOX_PATH,
        group="Delivery",
        parse=env.optional(str),
        shown="`.mlflow-feedback/outbox.db` (relative to the working directory)",
        variables=("MLFLOW_FEEDBACK_OUTBOX_PATH", "MLFLOW_FEEDBACK_OUTBOX"),
        convert=_outbox,
        doc="The sqlite file accepted feedback waits in until MLflow has it; share it between the workers of one"
        " service. `None` keeps it in memory (not durable).",
    )
    review_queue: str | None = _option(
        None,
        group="Delivery",
        parse=env.optional(str),
        shown="none",
        doc="Name of an MLflow review queue (MLflow 3.14+, the full `mlflow` package) that answers with negative or"
        " commented feedback are added to, created with label schemas from the feedback schema; off when none.",
    )
    _exclude: tuple[re.Pattern[str], ...] = field(init=False, repr=False)
    _identity: IdentityResolver = field(init=False, repr=False)
    _redact: frozenset[str] = field(init=False, repr=False)

    @classmethod
    def from_arguments(cls, given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from the middleware's arguments: each one left `UNSET` from its environment variable when
        that is set, else its default. A bad variable stops start-up with an error naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for option in options():
            name, meta = option.name, option.metadata
            value = given.get(name, UNSET)
            if value is UNSET and meta["parse"] is not None:
                found, value = env.read(name, meta["parse"], environ, meta["variables"])
                if not found:
                    continue  # the default
            elif value is UNSET:
                continue
            values[name] = meta["convert"](value) if meta["convert"] is not None else value
        unknown = set(given) - {option.name for option in options()}
        if unknown:
            raise TypeError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.feedback_path is not None and (
            not self.feedback_path.startswith("/") or self.feedback_path.endswith("/")
        ):
            raise ValueError("feedback_path must start with '/' and not end with it, e.g. '/feedback'")
        for name in (
            "trace_id_header",
            "request_id_header",
            "user_id_header",
            "session_id_header",
            "feedback_token_header",
        ):
            if not re.fullmatch(r"[A-Za-z0-9-]+", getattr(self, name)):
                raise ValueError(f"{name} must be a plain HTTP header name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.sse_event_name):
            raise ValueError("sse_event_name must be a plain token (letters, digits, '_', '.', '-')")
        low, high = self.rating_scale
        if not 0 < low < high:
            raise ValueError("rating_scale must be (low, high) with 0 < low < high")
        if self.export not in ("mlflow", "otlp"):
            raise ValueError("export must be 'mlflow' (MLflow's exporter) or 'otlp' (batched OTLP)")
        for name in ("max_capture_bytes", "max_feedback_body_bytes", "mlflow_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("feedback_wait_seconds", "feedback_sync_seconds", "trace_wait_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be zero or more")
        if self.summary_token is not None and len(self.summary_token) < 16:
            raise ValueError("summary_token must be at least 16 characters")
        if not self.feedback_token_ttl_seconds > 0:
            raise ValueError("feedback_token_ttl_seconds must be positive")
        object.__setattr__(self, "_identity", self.identity or AuthenticatedUserOrHeader(self.user_id_header))
        object.__setattr__(self, "_redact", frozenset(normalise_field(f) for f in self.redact_fields))
        object.__setattr__(self, "_exclude", tuple(re.compile(p) for p in self.exclude_paths))

    def redact(self, value: Any) -> Any:
        """A captured body or query with the values of `redact_fields` replaced, at any depth."""
        return redact(value, self._redact)

    def user_of(self, conn: HTTPConnection) -> str | None:
        """The end user of a request, from the identity resolver; None when anonymous."""
        return resolve_user(self._identity, conn)

    def is_excluded(self, path: str) -> bool:
        """Whether requests to `path` go untraced."""
        return any(p.search(path) for p in self._exclude)


def _strings(name: str, value: Iterable[str], expected: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"{name} takes {expected}, not one string")
    return tuple(value)


def options() -> tuple[Any, ...]:
    """The options, as dataclass fields of `Settings`, in their order of definition (grouped by concern)."""
    return tuple(f for f in fields(Settings) if f.init)


def _shown_default(option: Any) -> str:
    if option.metadata["shown"] is not None:
        return str(option.metadata["shown"])
    default = option.default if option.default is not MISSING else option.default_factory()
    return f"`{default!r}`".replace("'", '"') if isinstance(default, str) else f"`{default!r}`"


def options_table() -> str:
    """The configuration tables of docs/configuration.md, one per concern, generated from `Settings`."""
    out: list[str] = []
    for group in GROUPS:
        out += [f"**{group}**", "", "| Argument | Default | Variable | What it does |", "|---|---|---|---|"]
        for option in options():
            if option.metadata["group"] == group:
                doc = option.metadata["doc"].replace("|", "\\|")
                keys = option.metadata["variables"] or (env.variable(option.name),)
                if option.name == "feedback_secret":
                    keys = (*keys, "MLFLOW_FEEDBACK_PREVIOUS_SECRET")
                shown_keys = ", ".join(f"`{key}`" for key in keys)
                out.append(f"| `{option.name}` | {_shown_default(option)} | {shown_keys} | {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
