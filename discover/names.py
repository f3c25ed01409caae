"""Neuron names: `L{layer}.N{index}` in dense MLPs; in a mixture-of-experts layer `L{l}.E{e}.N{n}`
(neuron n of expert e) and `L{l}.S.N{n}` (neuron n of the shared expert).

Everything stored keeps one integer neuron axis per layer: a mixture-of-experts layer lays its
experts end to end, expert e's neuron n at `e * expert_size + n`, then the shared expert's. A
`Layout` translates between that index and the name users read and write."""

from __future__ import annotations

import re
from dataclasses import dataclass

from discover.errors import QueryError

NAME_RE = re.compile(r"^L([0-9]+)(?:\.(?:E([0-9]+)|(S)))?\.N([0-9]+)$")


@dataclass(frozen=True)
class Layout:
    """How a layer's neuron axis is laid out: dense (experts 0), or `experts` x `expert_size`
    routed neurons followed by `shared` neurons of a shared expert."""

    experts: int = 0
    expert_size: int = 0
    shared: int = 0

    def __post_init__(self):
        if self.experts < 0 or self.expert_size < 0 or self.shared < 0:
            raise ValueError(f"a layout has no negative sizes: {self}")
        if self.experts and not self.expert_size:
            raise ValueError("experts need an expert_size")

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def name(self, layer: int, index: int) -> str:
        """The name of neuron `index` of `layer`."""
        if not self.moe:
            return f"L{layer}.N{index}"
        routed = self.experts * self.expert_size
        if index < routed:
            return f"L{layer}.E{index // self.expert_size}.N{index % self.expert_size}"
        return f"L{layer}.S.N{index - routed}"

    def parse(self, text: str) -> tuple[int, int]:
        """'L3.N120' (dense) or 'L3.E2.N17' / 'L3.S.N5' (experts) -> (layer, index on the axis)."""
        m = NAME_RE.match(text.strip())
        if not m:
            raise QueryError(f"malformed neuron id '{text}'; write it as {self.example()}")
        layer, expert, shared, n = int(m.group(1)), m.group(2), m.group(3), int(m.group(4))
        if not self.moe:
            if expert is not None or shared:
                raise QueryError(f"'{text}' names an expert, but this model's MLPs are dense; write it as L{layer}.N{n}")
            return layer, n
        if expert is None and not shared:
            raise QueryError(
                f"layer {layer} is a mixture-of-experts layer: name a neuron as L{layer}.E<expert>.N<index> "
                f"(experts 0-{self.experts - 1}, neurons 0-{self.expert_size - 1})"
                + (f" or L{layer}.S.N<index> for its shared expert (0-{self.shared - 1})" if self.shared else ""))
        if shared:
            if not self.shared:
                raise QueryError(f"'{text}': this model's layers have no shared expert; name a routed one, "
                                 f"L{layer}.E<expert>.N<index>")
            if not 0 <= n < self.shared:
                raise QueryError(f"'{text}' is out of range: the shared expert has neurons 0-{self.shared - 1}")
            return layer, self.experts * self.expert_size + n
        e = int(expert)
        if not (0 <= e < self.experts and 0 <= n < self.expert_size):
            raise QueryError(f"'{text}' is out of range: experts 0-{self.experts - 1}, neurons "
                             f"0-{self.expert_size - 1} per expert")
        return layer, e * self.expert_size + n

    def example(self) -> str:
        return "L<layer>.E<expert>.N<index>, e.g. L3.E2.N17" if self.moe else "L<layer>.N<index>, e.g. L3.N120"

    def to_dict(self) -> dict:
        return {"experts": self.experts, "expert_size": self.expert_size, "shared": self.shared}


DENSE = Layout()


def layout_of(row: dict | None) -> Layout:
    """The layout stored with a checkpoint row (`neuron_layout`; dense where absent)."""
    raw = (row or {}).get("neuron_layout")
    if not raw:
        return DENSE
    if isinstance(raw, str):
        import json

        raw = json.loads(raw)
    return Layout(**raw)
