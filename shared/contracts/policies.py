"""Approval policies: which requests the platform may approve on its own.

A policy names a request kind (``cycle``, ``research``, ``promotion``), an
action (``auto_approve`` or ``require_approval``) and conditions that must all
hold. Policies are evaluated in order and the first that matches decides; when
none matches, a human approver is required. Research never auto-approves: the
loader refuses such a policy rather than let a file weaken that rule.

Policy file (YAML or JSON; ``NEURONS_POLICIES``, read by ``shared.policy_file``)::

    include_defaults: true          # append the built-in policies after these
    policies:
      - name: auto-mntp-under-energy  # same name as a default: replaces it
        kind: cycle
        action: auto_approve
        when: {training_kind: mntp, energy_wh_below: 20}
        description: small MNTP cycles need no human

Conditions (``when``):
  training_kind     the proposal's training kind equals this (mntp, rl)
  energy_wh_below   the proposal's energy estimate (Wh) is below this
  steps_at_most     the proposal's config.steps is at most this
  requested_by      the request was made by this requester
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping
from shared.contracts.values import number

KINDS = ("cycle", "research", "promotion")
AUTO_APPROVE = "auto_approve"
REQUIRE_APPROVAL = "require_approval"
ACTIONS = (AUTO_APPROVE, REQUIRE_APPROVAL)
# Named in a request when no policy matched: a human decides.
FALLBACK_POLICY = "human-approval-required"


class PolicyError(ValueError):
    """A policy file or entry that cannot be used; nothing is loaded from it."""




def _energy_below(request: Mapping[str, Any], limit: Any) -> bool:
    estimate = number(request.get("subject", {}).get("energy_estimate_wh"))
    # No estimate means no evidence that the job is small: never auto-approve on it.
    return estimate is not None and estimate < float(limit)


def _steps_at_most(request: Mapping[str, Any], limit: Any) -> bool:
    steps = number((request.get("subject", {}).get("config") or {}).get("steps"))
    return steps is not None and steps <= float(limit)


CONDITIONS: dict[str, Callable[[Mapping[str, Any], Any], bool]] = {
    "training_kind": lambda request, value: request.get("subject", {}).get("training_kind") == value,
    "energy_wh_below": _energy_below,
    "steps_at_most": _steps_at_most,
    "requested_by": lambda request, value: request.get("requested_by") == value,
}
_NUMERIC_CONDITIONS = {"energy_wh_below", "steps_at_most"}


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str
    action: str
    when: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise PolicyError("a policy needs a name")
        if self.kind not in KINDS:
            raise PolicyError(f"policy {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.action not in ACTIONS:
            raise PolicyError(f"policy {self.name!r}: action {self.action!r} is not one of {list(ACTIONS)}")
        if self.kind == "research" and self.action == AUTO_APPROVE:
            raise PolicyError(f"policy {self.name!r}: research always needs a human approver")
        for key, value in self.when.items():
            if key not in CONDITIONS:
                raise PolicyError(f"policy {self.name!r}: unknown condition {key!r}; known: {sorted(CONDITIONS)}")
            if key in _NUMERIC_CONDITIONS and number(value) is None:
                raise PolicyError(f"policy {self.name!r}: {key} needs a number")

    def matches(self, request: Mapping[str, Any]) -> bool:
        return request.get("kind") == self.kind and all(
            CONDITIONS[key](request, value) for key, value in self.when.items()
        )

    def rule(self) -> dict[str, Any]:
        """The rule as recorded in events, so an auditor reads why it applied."""
        return {"kind": self.kind, "action": self.action, "when": dict(self.when),
                "description": self.description}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        if not isinstance(data, Mapping):
            raise PolicyError(f"a policy is a mapping, got {data!r}")
        unknown = set(data) - {"name", "kind", "action", "when", "description"}
        if unknown:
            raise PolicyError(f"policy {data.get('name')!r}: unknown keys {sorted(unknown)}")
        when = data.get("when") or {}
        if not isinstance(when, Mapping):
            raise PolicyError(f"policy {data.get('name')!r}: when must be a mapping")
        return cls(name=data.get("name"), kind=data.get("kind"), action=data.get("action"),
                   when=dict(when), description=data.get("description") or "")


DEFAULT_POLICIES: tuple[Policy, ...] = (
    Policy("auto-mntp-under-energy", "cycle", AUTO_APPROVE,
           {"training_kind": "mntp", "energy_wh_below": 50.0},
           "routine MNTP cycles estimated under 50 Wh need no human"),
    Policy("cycle-needs-approver", "cycle", REQUIRE_APPROVAL, {},
           "any other training cycle needs an approver"),
    Policy("research-needs-approver", "research", REQUIRE_APPROVAL, {},
           "reinforcement-learning research always needs an approver"),
    Policy("promotion-needs-approver", "promotion", REQUIRE_APPROVAL, {},
           "promoting an adapter to production needs an approver"),
)


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...] = DEFAULT_POLICIES

    def __post_init__(self) -> None:
        names = [p.name for p in self.policies]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PolicyError(f"policy names must be unique: {duplicates}")

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def names(self) -> set[str]:
        return {p.name for p in self.policies}

    def get(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)


def default_policies() -> PolicySet:
    return PolicySet(DEFAULT_POLICIES)


def policies_from_dict(data: Mapping[str, Any] | None) -> PolicySet:
    if data is None:
        return default_policies()
    if not isinstance(data, Mapping):
        raise PolicyError("a policy file holds a mapping with a 'policies' list")
    entries = data.get("policies") or []
    if not isinstance(entries, list):
        raise PolicyError("'policies' must be a list")
    own = tuple(Policy.from_dict(entry) for entry in entries)
    if data.get("include_defaults", True):
        mine = {p.name for p in own}
        own += tuple(p for p in DEFAULT_POLICIES if p.name not in mine)
    return PolicySet(own)


# --- evaluation ---------------------------------------------------------------


@dataclass(frozen=True)
class PolicyDecision:
    auto_approve: bool
    policy_name: str
    rule: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.policy_name, "auto_approve": self.auto_approve, "rule": self.rule}


def proposal_subject(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What policies look at in a ``cycle.proposed`` / ``research.proposed`` payload.

    Approval records it in the request and evolution rebuilds it to check a
    policy grant, so both read the proposal the same way.
    """
    dataset = payload.get("dataset") or {}
    return {
        "cycle_id": payload["cycle_id"],
        "training_kind": payload.get("kind"),
        "model": payload.get("model"),
        "dataset_id": dataset.get("dataset_id") if isinstance(dataset, Mapping) else None,
        "energy_estimate_wh": payload.get("energy_estimate_wh"),
        "config": dict(payload.get("config") or {}),
        "warm_start": payload.get("warm_start"),
    }


def request_view(kind: str, subject: Mapping[str, Any], requested_by: str | None) -> dict[str, Any]:
    """The request as policies see it."""
    return {"kind": kind, "subject": dict(subject), "requested_by": requested_by}


def evaluate(policies: PolicySet, request: Mapping[str, Any]) -> PolicyDecision:
    """The first policy that matches ``request`` decides; none means a human decides.

    ``request`` is ``{"kind", "subject", "requested_by"}`` (see ``request_view``).
    """
    for policy in policies:
        if policy.matches(request):
            return PolicyDecision(policy.action == AUTO_APPROVE, policy.name, policy.rule())
    rule = {"kind": request.get("kind"), "action": REQUIRE_APPROVAL, "when": {},
            "description": "no policy matched"}
    return PolicyDecision(False, FALLBACK_POLICY, rule)


def authorises(policies: PolicySet, policy_name: str, request: Mapping[str, Any]) -> bool:
    """Whether ``policy_name`` is the policy that auto-approves ``request`` here.

    A grant that names a policy is only as good as this check: the name must
    exist and be the one that would have approved the same request.
    """
    if policies.get(policy_name) is None:
        return False
    decision = evaluate(policies, request)
    return decision.auto_approve and decision.policy_name == policy_name
