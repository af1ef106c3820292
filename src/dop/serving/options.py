"""What the user asks the plugin for (``--additional-config '{"dop": {...}}'``), read and
checked the same way by ``dop serve`` before vLLM starts and by the model class inside
vLLM (docs/serving.md, "Options")."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..policy import Policy
from ..rankers import resolve_ranker

KEY = "dop"  # the additional_config entry that holds dop's options
# rankers that order an image from the image alone: vLLM encodes an image once, before and
# apart from its prompt's text and its place in the prompt (docs/serving.md, "Rankers")
SERVING_RANKERS = ("identity", "spatial", "vispruner")
_FIELDS = ("policy", "ranker")


@dataclass(frozen=True)
class ServingOptions:
    policy: Policy
    ranker: str  # a registered ranker name, options allowed ("vispruner:important_ratio=0.5")

    @property
    def prunes(self) -> bool:
        return not self.policy.is_unpruned()


def read_serving_policy(path: str, ranker: str | None = None, num_layers: int | None = None) -> ServingOptions:
    """The policy file at ``path`` (and the ranker: ``ranker``, else the policy's, else
    identity), checked for serving; ``num_layers`` checks the model's depth. Raises
    ``ValueError`` with one line naming what is wrong."""
    policy = Policy.from_json(path)
    if num_layers is not None:
        policy = policy.check_layers(int(num_layers))
    name = policy.ranker_or(ranker) or "identity"
    if not isinstance(name, str):
        raise ValueError(f"dop serving: the ranker must be a name, got {type(name).__name__}")
    base = name.partition(":")[0]
    if base not in SERVING_RANKERS and not policy.is_unpruned():
        raise ValueError(
            f"dop serving: ranker {base!r} is not available under vLLM (it needs the prompt's text, "
            f"the image's place in its prompt or the decoder's states); use one of {', '.join(SERVING_RANKERS)}")
    resolve_ranker(name)  # unknown names and bad options fail here, before vLLM starts
    return ServingOptions(policy, name)


def options_from_additional_config(additional: dict | None, num_layers: int | None = None) -> ServingOptions | None:
    """The options in vLLM's ``additional_config`` (None when it has no ``dop`` entry)."""
    entry = (additional or {}).get(KEY)
    if entry is None:
        return None
    if isinstance(entry, str):  # --additional-config may arrive as text
        entry = json.loads(entry)
    if not isinstance(entry, dict) or "policy" not in entry:
        raise ValueError(f'dop serving: additional_config["{KEY}"] must be an object with a "policy" path, got {entry!r}')
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ValueError(f'dop serving: unknown option(s) {unknown} in additional_config["{KEY}"]; known: {list(_FIELDS)}')
    return read_serving_policy(entry["policy"], entry.get("ranker"), num_layers)
