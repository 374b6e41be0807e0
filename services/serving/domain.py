"""What serving knows and decides: which adapter answers which model name, and which requests it takes. Pure.

State. Folded from events the runtime has already admitted (signature,
producer and, for the events that change what serves, the operator's signed
decision: ``shared.trust_view``):

- ``profile.created`` / ``profile.updated`` carry the whole profile: traits,
  interaction style, context preferences, channel, version and the adapter it
  serves (a replayed older version changes nothing);
- ``profile.adapter_updated`` moves a profile onto its channel's new adapter
  (the version counts edits, so it stays);
- ``adapter.promoted`` / ``adapter.rolled_back`` put an adapter on a channel.

An adapter's kind (``mntp``: an LLM2Vec encoder; ``rl``: a causal policy) is
named by the channel events; a profile event that arrives first (the topics
differ) gets it when they do. Until then the kind is ``None`` and the caller
asks the loaded adapter (``AdapterPool.kind_of``).

Routing. A request names a ``model``: a profile id, answered by the profile's
adapter with a system prompt made from the profile, or ``channel:<name>``,
answered by the channel's adapter with no system prompt. No adapter yet means
the base model, which embeds and generates. ``route`` is called once per
request; what it returns serves the request to its end.

Requests. ``check_request`` turns an OpenAI-shaped body into bounded values
or a ``ServingError`` (a 4xx with the OpenAI error code), so that no client
mistake reaches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Mapping

KINDS = ("mntp", "rl")
CHANNEL_PREFIX = "channel:"
EMBEDDINGS, COMPLETIONS, CHAT = "/v1/embeddings", "/v1/completions", "/v1/chat/completions"
ENDPOINTS_OF_KIND = {"mntp": (EMBEDDINGS,), "rl": (COMPLETIONS, CHAT)}  # the base model serves all three
WHAT_KIND_IS = {"mntp": "an MNTP adapter is an encoder (LLM2Vec): it embeds text and does not generate",
                "rl": "an RL adapter is a causal policy: it generates text and does not embed"}
ROLES = ("system", "developer", "user", "assistant", "tool")
RELEVANT = frozenset({"profile.created", "profile.updated", "profile.adapter_updated",
                      "adapter.promoted", "adapter.rolled_back"})


class ServingError(Exception):
    """A request serving turns down: the HTTP status, the OpenAI error code, and why (``param``: the field)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param


# --- state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    sha256: str
    uri: str
    kind: str | None = None  # None: not named by any event seen yet


@dataclass(frozen=True)
class Profile:
    profile_id: str
    traits: Mapping[str, Any]
    interaction_style: str
    context_preferences: Mapping[str, Any]
    channel: str
    version: int
    adapter: Adapter | None = None  # None: the base model, until its channel has an adapter
    since: str | None = None  # when the profile was created (ISO)

    def to_dict(self) -> dict[str, Any]:
        return {"profile_id": self.profile_id, "traits": dict(self.traits),
                "interaction_style": self.interaction_style,
                "context_preferences": dict(self.context_preferences), "channel": self.channel,
                "version": self.version, "adapter": vars(self.adapter) if self.adapter else None,
                "since": self.since}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        adapter = data.get("adapter")
        return cls(data["profile_id"], dict(data["traits"]), data["interaction_style"],
                   dict(data["context_preferences"]), data["channel"], data["version"],
                   Adapter(**adapter) if adapter else None, data.get("since"))


@dataclass(frozen=True)
class Channel:
    name: str
    adapter: Adapter
    since: str | None = None  # when this adapter was put on the channel (ISO)


@dataclass(frozen=True)
class ServingState:
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    channels: Mapping[str, Channel] = field(default_factory=dict)
    kinds: Mapping[str, str] = field(default_factory=dict)  # adapter sha256 -> kind, as the channel events said

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per profile, channel and adapter whose kind is known."""
        rows: dict[str, dict[str, Any]] = {f"profile:{k}": p.to_dict() for k, p in self.profiles.items()}
        rows.update({f"channel:{k}": {"name": c.name, "adapter": vars(c.adapter), "since": c.since}
                     for k, c in self.channels.items()})
        rows.update({f"kind:{sha}": {"kind": kind} for sha, kind in self.kinds.items()})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]]) -> "ServingState":
        profiles, channels, kinds = {}, {}, {}
        for key, record in rows.items():
            prefix, name = key.split(":", 1)
            if prefix == "profile":
                profiles[name] = Profile.from_dict(record)
            elif prefix == "channel":
                channels[name] = Channel(record["name"], Adapter(**record["adapter"]), record.get("since"))
            elif prefix == "kind":
                kinds[name] = record["kind"]
        return cls(profiles, channels, kinds)


def initial_state() -> ServingState:
    return ServingState()


# --- evolve --------------------------------------------------------------------------


def evolve(state: ServingState, event: Any) -> ServingState:
    """Fold one admitted event in; any other type, or an older copy of a profile, leaves the state as it is."""
    etype, p = event.type, event.payload
    if etype in ("adapter.promoted", "adapter.rolled_back"):
        adapter = Adapter(p["adapter_sha256"], p["adapter_uri"], p.get("kind") or "mntp")
        at = p.get("promoted_at") or p.get("rolled_back_at")
        state = replace(state, channels={**state.channels, p["channel"]: Channel(p["channel"], adapter, at)},
                        kinds={**state.kinds, adapter.sha256: adapter.kind})
        return _name_kind(state, adapter.sha256, adapter.kind)
    if etype in ("profile.created", "profile.updated"):
        known = state.profiles.get(p["profile_id"])
        if known is not None and p["version"] < known.version:
            return state  # an older copy, delivered again
        sha = p.get("active_adapter_sha256")
        adapter = Adapter(sha, p.get("active_adapter_uri") or "", state.kinds.get(sha)) if sha else None
        profile = Profile(p["profile_id"], dict(p["traits"]), p["interaction_style"],
                          dict(p["context_preferences"]), p["channel"], p["version"], adapter,
                          known.since if known else p.get("created_at"))
        return replace(state, profiles={**state.profiles, profile.profile_id: profile})
    if etype == "profile.adapter_updated":
        known = state.profiles.get(p["profile_id"])
        if known is None:
            return state
        sha = p["adapter_sha256"]
        adapter = Adapter(sha, p["adapter_uri"], p.get("kind") or state.kinds.get(sha))
        return replace(state, profiles={**state.profiles, known.profile_id: replace(known, adapter=adapter)})
    return state


def _name_kind(state: ServingState, sha: str, kind: str) -> ServingState:
    """Profiles that serve ``sha`` without knowing its kind learn it."""
    named = {k: replace(p, adapter=replace(p.adapter, kind=kind)) for k, p in state.profiles.items()
             if p.adapter is not None and p.adapter.sha256 == sha and p.adapter.kind is None}
    return replace(state, profiles={**state.profiles, **named}) if named else state


def decide(message: Any, state: ServingState, config: Any = None) -> list:
    """Serving publishes nothing in answer to an event: what it loads is reported by the runtime that loads it."""
    return []


# --- routing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What serves one request, fixed when the request starts."""

    model: str  # as the request named it
    adapter_sha256: str | None  # None: the base model
    adapter_uri: str | None
    kind: str | None  # mntp | rl; None: the base model, or an adapter whose kind no event named yet
    channel: str
    profile_id: str | None = None
    profile_version: int | None = None
    system_prompt: str | None = None

    @property
    def base(self) -> bool:
        return self.adapter_sha256 is None

    def with_kind(self, kind: str | None) -> "Route":
        return replace(self, kind=kind)


def route(state: ServingState, model: str) -> Route:
    """The route for ``model`` (a profile id or ``channel:<name>``); 404 ``model_not_found`` for anything else."""
    if not isinstance(model, str) or not model:
        raise ServingError(400, "missing_model", "name a model: a profile id or channel:<name>", "model")
    if model.startswith(CHANNEL_PREFIX):
        name = model[len(CHANNEL_PREFIX):]
        if name not in known_channels(state):
            raise ServingError(404, "model_not_found", f"the model {model!r} does not exist: no channel {name!r} "
                                                       "has an adapter or a profile following it", "model")
        channel = state.channels.get(name)
        adapter = channel.adapter if channel else None
        return Route(model, adapter.sha256 if adapter else None, adapter.uri if adapter else None,
                     adapter.kind if adapter else None, name)
    profile = state.profiles.get(model)
    if profile is None:
        raise ServingError(404, "model_not_found", f"the model {model!r} does not exist: it is neither a profile "
                                                   "nor channel:<name> (GET /v1/models lists them)", "model")
    adapter = profile.adapter
    return Route(model, adapter.sha256 if adapter else None, adapter.uri if adapter else None,
                 adapter.kind if adapter else None, profile.channel, profile.profile_id, profile.version,
                 system_prompt(profile))


def known_channels(state: ServingState) -> set[str]:
    return set(state.channels) | {p.channel for p in state.profiles.values()}


def system_prompt(profile: Profile) -> str:
    """The persona a profile asks for, in a stable order (sorted keys), so every replica says the same."""
    lines = [f"You are the assistant of the profile {profile.profile_id!r}."]
    if profile.traits:
        lines.append("Your traits: " + "; ".join(f"{k}: {_text(v)}" for k, v in sorted(profile.traits.items())) + ".")
    if profile.interaction_style.strip():
        lines.append(f"Interaction style: {profile.interaction_style.strip()}")
    if profile.context_preferences:
        lines.append("Context preferences: " + "; ".join(
            f"{k}: {_text(v)}" for k, v in sorted(profile.context_preferences.items())) + ".")
    return "\n".join(lines)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def check_kind(route: Route, endpoint: str) -> None:
    """An encoder only embeds, a policy only generates, the base model does both; else 400 with the reason."""
    if route.base:
        return
    if route.kind not in KINDS:
        raise ServingError(503, "adapter_kind_unknown", f"adapter {route.adapter_sha256} serves {route.model!r} "
                                                        "but its kind (mntp or rl) is not known yet")
    if endpoint not in ENDPOINTS_OF_KIND[route.kind]:
        raise ServingError(400, "adapter_kind_mismatch",
                           f"{route.model!r} is served by {route.kind} adapter {route.adapter_sha256}: "
                           f"{WHAT_KIND_IS[route.kind]}; use {' or '.join(ENDPOINTS_OF_KIND[route.kind])}",
                           "model")


# --- the model list ------------------------------------------------------------------


def models(state: ServingState) -> list[dict[str, Any]]:
    """``GET /v1/models``: every profile, then every channel, each with the adapter that serves it now."""
    listed = []
    for profile in sorted(state.profiles.values(), key=lambda p: p.profile_id):
        listed.append(_model_entry(profile.profile_id, profile.since, profile.adapter, profile.channel,
                                   profile.version))
    for name in sorted(known_channels(state)):
        channel = state.channels.get(name)
        listed.append(_model_entry(CHANNEL_PREFIX + name, channel.since if channel else None,
                                   channel.adapter if channel else None, name, None))
    return listed


def _model_entry(model_id: str, since: str | None, adapter: Adapter | None, channel: str,
                 version: int | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _epoch(since), "owned_by": "neurons",
            "neurons": {"channel": channel, "profile_version": version,
                        "adapter_sha256": adapter.sha256 if adapter else None,
                        "adapter_kind": adapter.kind if adapter else None, "endpoints": endpoints_for(adapter)}}


def endpoints_for(adapter: Adapter | None) -> list[str]:
    """What a model can answer: the base model everything, an adapter what its kind does (unknown: not said)."""
    if adapter is None:
        return [EMBEDDINGS, COMPLETIONS, CHAT]
    return list(ENDPOINTS_OF_KIND.get(adapter.kind or "", ()))


def _epoch(at: str | None) -> int:
    if not at:
        return 0
    try:
        return int(datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


# --- request bounds ------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    max_tokens: int = 256  # the most tokens one completion may ask for
    timeout_s: float = 60.0  # one request, queueing included
    queue: int = 16  # requests waiting for the model beyond those running; more are refused (429)
    concurrency: int = 1  # requests the model works on at once
    default_max_tokens: int = 128  # when a request names none
    max_texts: int = 64  # inputs of one embeddings request
    max_input_chars: int = 32_000  # characters of all inputs (or messages) of one request
    max_stop: int = 4
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class Checked:
    """A request's values once bounded: what the model is asked for."""

    model: str
    texts: tuple[str, ...] = ()  # embeddings
    prompt: str | None = None  # completions
    messages: tuple[Mapping[str, str], ...] = ()  # chat, the client's own
    max_tokens: int = 0
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    encoding_format: str = "float"  # embeddings: float or base64
    dimensions: int | None = None


def check_request(endpoint: str, body: Any, limits: RequestLimits) -> Checked:
    """The bounded values of an OpenAI request body to ``endpoint``, or a 4xx ``ServingError``."""
    if not isinstance(body, Mapping):
        raise ServingError(400, "invalid_body", "the body must be one JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServingError(400, "missing_model", "name a model: a profile id or channel:<name>", "model")
    if endpoint == EMBEDDINGS:
        return _check_embeddings(model, body, limits)
    if body.get("n") not in (None, 1):
        raise ServingError(400, "unsupported_value", "only n=1 is served", "n")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, Mapping) and options.get("include_usage"))
    common = dict(model=model, max_tokens=_max_tokens(body, limits), temperature=_temperature(body),
                  stop=_stop(body, limits), stream=stream, include_usage=include_usage)
    if endpoint == COMPLETIONS:
        return Checked(prompt=_prompt(body, limits), **common)
    if endpoint == CHAT:
        return Checked(messages=_messages(body, limits), **common)
    raise ServingError(404, "unknown_endpoint", f"no endpoint {endpoint}")


def _check_embeddings(model: str, body: Mapping[str, Any], limits: RequestLimits) -> Checked:
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ServingError(400, "invalid_input", "input must be a string or a list of strings "
                                                 "(token arrays are not served)", "input")
    if not texts:
        raise ServingError(400, "empty_input", "input holds no text", "input")
    if any(not t.strip() for t in texts):
        raise ServingError(400, "empty_input", "an input text is empty", "input")
    if len(texts) > limits.max_texts:
        raise ServingError(400, "too_many_inputs", f"{len(texts)} inputs; at most {limits.max_texts} "
                                                   "per request", "input")
    _check_size(sum(len(t) for t in texts), limits, "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ServingError(400, "invalid_value", "encoding_format is float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise ServingError(400, "invalid_value", "dimensions must be a positive integer", "dimensions")
    return Checked(model=model, texts=tuple(texts), encoding_format=encoding, dimensions=dimensions)


def _max_tokens(body: Mapping[str, Any], limits: RequestLimits) -> int:
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(param)
    if value is None:
        return min(limits.default_max_tokens, limits.max_tokens)
    if not _is_int(value) or not 1 <= value <= limits.max_tokens:
        raise ServingError(400, "invalid_max_tokens", f"{param} must be an integer from 1 to "
                                                      f"{limits.max_tokens}, not {value!r}", param)
    return value


def _temperature(body: Mapping[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 2.0:
        raise ServingError(400, "invalid_value", f"temperature must be a number from 0 to 2, not {value!r}",
                           "temperature")
    return float(value)


def _stop(body: Mapping[str, Any], limits: RequestLimits) -> tuple[str, ...]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ServingError(400, "invalid_value", "stop must be a string or a list of non-empty strings", "stop")
    if len(stops) > limits.max_stop:
        raise ServingError(400, "invalid_value", f"at most {limits.max_stop} stop sequences", "stop")
    return tuple(stops)


def _prompt(body: Mapping[str, Any], limits: RequestLimits) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ServingError(400, "invalid_prompt", "prompt must be one string (a batch of prompts and token "
                                                  "arrays are not served)", "prompt")
    if not prompt.strip():
        raise ServingError(400, "empty_input", "the prompt is empty", "prompt")
    _check_size(len(prompt), limits, "prompt")
    return prompt


def _messages(body: Mapping[str, Any], limits: RequestLimits) -> tuple[Mapping[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServingError(400, "empty_input", "messages must be a non-empty list", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ServingError(400, "invalid_message", f"messages[{i}] needs a role: one of {', '.join(ROLES)}",
                               f"messages[{i}].role")
        checked.append({"role": message["role"], "content": _content(message.get("content"), i)})
    if not any(m["content"].strip() for m in checked):
        raise ServingError(400, "empty_input", "every message is empty", "messages")
    _check_size(sum(len(m["content"]) for m in checked), limits, "messages")
    return tuple(checked)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, Mapping) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ServingError(400, "invalid_message", f"messages[{i}].content must be text (images, audio and files "
                                               "are not served)", f"messages[{i}].content")


def _check_size(chars: int, limits: RequestLimits, param: str) -> None:
    if chars > limits.max_input_chars:
        raise ServingError(413, "input_too_large", f"{chars} characters of {param}; at most "
                                                   f"{limits.max_input_chars} per request", param)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ServingError(400, "invalid_value", f"{name} must be true or false", name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- errors as OpenAI writes them ------------------------------------------------------


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}


def error_body(error: ServingError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, the body every OpenAI client reads."""
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


# --- swapping ----------------------------------------------------------------------------


def adapters_in(state: ServingState) -> dict[str, Adapter]:
    """Every adapter some profile or channel serves, by sha256: what must be resident to answer."""
    found = {c.adapter.sha256: c.adapter for c in state.channels.values() if c.adapter is not None}
    found.update({p.adapter.sha256: p.adapter for p in state.profiles.values() if p.adapter is not None})
    return found


def keep_serving(new: ServingState, old: ServingState, sha: str) -> ServingState:
    """``new``, except that what would move onto adapter ``sha`` (which could not be loaded) keeps what it
    served in ``old``: a failed swap leaves the previous adapter answering."""
    profiles = {pid: (old.profiles.get(pid, p) if p.adapter is not None and p.adapter.sha256 == sha else p)
                for pid, p in new.profiles.items()}
    channels = {name: (old.channels[name] if c.adapter is not None and c.adapter.sha256 == sha
                       and name in old.channels else c)
                for name, c in new.channels.items()}
    channels = {name: c for name, c in channels.items() if c.adapter is None or c.adapter.sha256 != sha}
    return replace(new, profiles=profiles, channels=channels)
