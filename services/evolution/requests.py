"""What an operator's request for a cycle may ask: the rules ``domain`` applies before it starts one.

An explicit setting runs exactly as given or the request is refused: it is
never moved into the search's bounds behind the operator's back
(``setting_problems``). Only an admin may let a cycle pass a gate, and only a
gate in ``gates.FORCEABLE_GATES`` (``forced_gate_problem``).

Pure, no I/O.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from services.evolution.gates import FORCEABLE_GATES
from services.evolution.search import SearchSpace
from shared.contracts.trust import Keyring


def setting_problems(space: SearchSpace, settings: Mapping[str, Any]) -> list[str]:
    """Why each of an operator's explicit settings cannot run exactly as given (empty: all can)."""
    problems = []
    for param in space.params:
        if param.name not in settings:
            continue
        value = settings[param.name]
        if param.scale == "choice":
            if isinstance(value, bool) or value not in param.choices:
                problems.append(f"{param.name}={value!r} is not one of {list(param.choices)}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            problems.append(f"{param.name}={value!r} is not a number")
        elif param.scale == "int" and not float(value).is_integer():
            problems.append(f"{param.name}={value!r} is not a whole number")
        elif not param.low <= value <= param.high:
            problems.append(f"{param.name}={value!r} is outside the allowed range "
                            f"[{param.low:g}, {param.high:g}]")
    return problems


def forced_gate_problem(force_gates: Iterable[str], operator_id: str, keyring: Keyring) -> str | None:
    """Why ``operator_id`` may not let a cycle pass ``force_gates`` (None: it may, or asks for none)."""
    force_gates = sorted(set(force_gates))
    if not force_gates:
        return None
    refused = [gate for gate in force_gates if gate not in FORCEABLE_GATES]
    if refused:
        return f"gate {', '.join(refused)} cannot be forced; forceable: {', '.join(FORCEABLE_GATES)}"
    operator = keyring.get(operator_id)
    if operator is None or not operator.has_role("admin"):
        held = ", ".join(operator.roles) if operator else "no role in the keyring"
        return f"forcing the {', '.join(force_gates)} gate needs the admin role; {operator_id} holds {held}"
    return None
