"""The serving plugin's row selection (dop.serving.runtime.ServingSession) without vLLM:
for every op kind and layer, the rows a pruned vLLM layer computes are exactly the text rows
plus the visual rows whose group the policy processes there (docs/design.md, "What skipping
means"); a forward with no groups set (vLLM's warm-up) is all text."""

from __future__ import annotations

import torch

from dop import Policy
from dop.policy import OP_KINDS
from dop.serving.runtime import ServingSession

POLICY = Policy(8, (0.25, 0.5, 1.0), {"attn_q": [8, 6, 2], "attn_kv": [8, 5, 1], "mlp": [8, 3, 0]},
                skip={"attn_kv": [[2], [1, 3], []], "mlp": [[5], [], []]})


def test_rows_follow_the_policy_per_kind_and_layer():
    s = ServingSession(POLICY)
    groups = torch.tensor([-1, 0, 1, 2, 2, -1, 1, 0])
    s.set_groups(groups)
    s.begin(10, "cpu")  # two padding rows from vLLM: text, computed, never read
    for kind in OP_KINDS:
        for layer in range(8):
            want = [i for i, g in enumerate(groups.tolist() + [-1, -1])
                    if g < 0 or POLICY.processed(kind, g, layer)]
            rows = s.rows(kind, layer)
            got = list(range(10)) if rows is None else rows.tolist()
            assert got == want, (kind, layer)


def test_forward_without_groups_is_all_text_and_groups_are_used_once():
    s = ServingSession(POLICY)
    s.set_groups(torch.tensor([2, 2]))
    s.begin(2, "cpu")
    assert s.rows("mlp", 0).tolist() == []  # group 2 has mlp depth 0
    s.begin(2, "cpu")  # the next forward set no groups: a warm-up, every row is text
    assert all(s.rows(k, l) is None for k in OP_KINDS for l in range(8))
