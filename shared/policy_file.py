"""Reading the approval policy file named by ``NEURONS_POLICIES`` (the rules live in ``shared.contracts.policies``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from shared.contracts.policies import PolicyError, PolicySet, default_policies, policies_from_dict


def load_policies(path: str | os.PathLike | None = None) -> PolicySet:
    """The policy set in ``path`` (YAML or JSON); the built-in defaults when ``path`` is None.

    A path that is given but missing or unreadable raises: approving with
    defaults the operator did not choose would be worse than not starting.
    """
    if path is None:
        return default_policies()
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return policies_from_dict(data)
