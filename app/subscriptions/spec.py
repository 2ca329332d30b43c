"""A Subscription resource read as the Subscriptions R5 Backport IG 1.1 (R4) profile says.

``criteria`` is the topic's canonical URL (or, as earlier versions of the backport wrote it,
the topic in a ``backport-topic-canonical`` extension); the filters are
``backport-filter-criteria`` extensions on ``criteria``; the channel carries
``backport-heartbeat-period``, ``backport-timeout`` and ``backport-max-count``, its payload the
``backport-payload-content`` (empty, id-only, full-resource). Whatever carecoord cannot honour
is refused when the Subscription is written (400 or 422), never accepted and ignored.

Channels (Backport IG 1.1, "Channels"): ``rest-hook`` needs an http(s) ``endpoint``;
``websocket`` is the channel "that does not require the client to have an endpoint" (the
client connects to the server, app/subscriptions/websocket.py), so a websocket channel with an
``endpoint`` or ``header`` lines (which only rest-hook conveys) is refused rather than ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.fhir.errors import BadRequest, BusinessRule
from app.fhir.fhirdate import date_range
from app.outbound import parse_url
from app.subscriptions.filters import Filter, parse_filters
from app.subscriptions.notifications import CONTENT_CODES as CONTENTS
from app.subscriptions.topics import TOPICS, Topic, topic_of

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
FILTER_CRITERIA = f"{BACKPORT}/backport-filter-criteria"
TOPIC_CANONICAL = f"{BACKPORT}/backport-topic-canonical"
HEARTBEAT_PERIOD = f"{BACKPORT}/backport-heartbeat-period"
TIMEOUT = f"{BACKPORT}/backport-timeout"
MAX_COUNT = f"{BACKPORT}/backport-max-count"
PAYLOAD_CONTENT = f"{BACKPORT}/backport-payload-content"
BACKPORT_PROFILE = f"{BACKPORT}/backport-subscription"

REST_HOOK = "rest-hook"
WEBSOCKET = "websocket"
CHANNEL_TYPES = (REST_HOOK, WEBSOCKET)
"""Channels carecoord delivers on (R4 subscription-channel-type codes)."""
PAYLOAD_TYPES = ("application/fhir+json", "application/json")
DEFAULT_TIMEOUT = 10
MAX_TIMEOUT = 120
DEFAULT_MAX_COUNT = 20
MAX_MAX_COUNT = 100
MIN_HEARTBEAT = 1
MAX_FILTERS = 10
MAX_ENDPOINT_CHARS = 2000

_HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}):[ \t]*([\x20-\x7e\t]{0,2000})")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "te", "upgrade", "trailer"}
)


@dataclass(frozen=True)
class SubscriptionSpec:
    topic: Topic
    filter: Filter
    channel_type: str
    endpoint: str | None
    headers: tuple[str, ...]
    content: str
    heartbeat_seconds: int | None
    timeout_seconds: int
    max_count: int
    end_at: datetime | None
    status: str


def _extensions(node: object, url: str) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    return [e for e in node.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def _one_value(node: object, url: str, key: str) -> Any:
    found = _extensions(node, url)
    if len(found) > 1:
        raise BadRequest(f"the extension {url} may appear once")
    return found[0].get(key) if found else None


def read_spec(data: dict[str, Any]) -> SubscriptionSpec:
    """The Subscription's request, checked; BadRequest/BusinessRule name what is wrong."""
    criteria = data.get("criteria")
    if not isinstance(criteria, str) or not criteria:
        raise BadRequest(
            "Subscription.criteria must name a subscription topic", expression=("Subscription.criteria",)
        )
    filters = [e.get("valueString") for e in _extensions(data.get("_criteria"), FILTER_CRITERIA)]
    topic = topic_of(criteria)
    if topic is None:
        # Backport STU1 style: the topic in an extension, ``criteria`` a filter.
        legacy = _one_value(data.get("_criteria"), TOPIC_CANONICAL, "valueCanonical") or _one_value(
            data, TOPIC_CANONICAL, "valueUri"
        )
        topic = topic_of(legacy) if isinstance(legacy, str) else None
        if topic is not None and "?" in criteria:
            filters.append(criteria)
    if topic is None:
        known = ", ".join(t.url for t in TOPICS)
        raise BusinessRule(
            f"carecoord does not offer the topic {criteria[:200]!r} (topics: {known})",
            expression=("Subscription.criteria",),
        )
    if any(not isinstance(f, str) or not f for f in filters):
        raise BadRequest("every backport-filter-criteria extension needs a valueString")
    if len(filters) > MAX_FILTERS:
        raise BadRequest(f"at most {MAX_FILTERS} filter criteria per Subscription")
    flt = parse_filters(topic, [str(f) for f in filters])

    channel = data.get("channel")
    if not isinstance(channel, dict):
        raise BadRequest("Subscription.channel is required", expression=("Subscription.channel",))
    channel_type = channel.get("type")
    if channel_type not in CHANNEL_TYPES:
        raise BusinessRule(
            f"channel type {str(channel_type)[:40]!r} is not supported"
            f" (supported: {', '.join(CHANNEL_TYPES)})",
            expression=("Subscription.channel.type",),
        )
    endpoint = channel.get("endpoint")
    if channel_type == WEBSOCKET:
        if endpoint is not None:
            raise BadRequest(
                "a websocket channel has no endpoint: the client connects to the server"
                " (Subscription/[id]/$get-ws-binding-token gives the URL)",
                expression=("Subscription.channel.endpoint",),
            )
        if channel.get("header") is not None:
            raise BadRequest(
                "channel.header lines are HTTP headers of rest-hook notifications; a websocket"
                " channel has none",
                expression=("Subscription.channel.header",),
            )
    elif (
        not isinstance(endpoint, str)
        or not endpoint.startswith(("https://", "http://"))
        or len(endpoint) > MAX_ENDPOINT_CHARS
        or parse_url(endpoint) is None
    ):
        raise BadRequest(
            "a rest-hook channel needs an http(s) endpoint URL", expression=("Subscription.channel.endpoint",)
        )
    payload = channel.get("payload")
    content = _one_value(channel.get("_payload"), PAYLOAD_CONTENT, "valueCode")
    if payload is None:
        content = "empty"  # R4: no payload type, no payload
    elif payload.split(";", 1)[0].strip() not in PAYLOAD_TYPES:
        raise BusinessRule(
            f"payload {str(payload)[:60]!r} is not supported (carecoord sends application/fhir+json)",
            expression=("Subscription.channel.payload",),
        )
    content = content or "id-only"
    if content not in CONTENTS:
        raise BadRequest(f"payload content {str(content)[:40]!r} is not one of {', '.join(CONTENTS)}")
    headers = tuple(channel.get("header") or ())
    for header in headers:
        match = _HEADER.fullmatch(header) if isinstance(header, str) else None
        if match is None or match.group(1).lower() in _RESERVED_HEADERS:
            raise BadRequest(
                "each channel.header must be 'Name: value' (printable, no reserved header names)",
                expression=("Subscription.channel.header",),
            )
    heartbeat = _bounded(channel, HEARTBEAT_PERIOD, "valueUnsignedInt", None, MIN_HEARTBEAT, 86400 * 7)
    timeout = _bounded(channel, TIMEOUT, "valueUnsignedInt", DEFAULT_TIMEOUT, 1, MAX_TIMEOUT)
    max_count = _bounded(channel, MAX_COUNT, "valuePositiveInt", DEFAULT_MAX_COUNT, 1, MAX_MAX_COUNT)
    end_at = None
    if isinstance(data.get("end"), str):
        span = date_range(data["end"])
        end_at = span[0] if span else None
    return SubscriptionSpec(
        topic,
        flt,
        channel_type,
        endpoint,
        headers,
        content,
        heartbeat,
        timeout or DEFAULT_TIMEOUT,
        max_count or DEFAULT_MAX_COUNT,
        end_at,
        str(data.get("status") or "requested"),
    )


def _bounded(
    channel: dict[str, Any], url: str, key: str, default: int | None, low: int, high: int
) -> int | None:
    value = _one_value(channel, url, key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        name = url.rsplit("/", 1)[-1]
        raise BusinessRule(
            f"{name} must be a whole number from {low} to {high}", expression=("Subscription.channel",)
        )
    return value
