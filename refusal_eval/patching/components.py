"""Components: what gets patched, with stable TransformerLens-style ids."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["embed", "resid_pre", "attn_out", "mlp_out", "head", "resid_post"]
KINDS: tuple[str, ...] = ("embed", "resid_pre", "attn_out", "mlp_out", "head", "resid_post")
DEFAULT_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head")
# The components that write into the residual stream (what a layer adds), as opposed to the stream itself, which
# at late layers carries everything by construction.
WRITER_KINDS: tuple[str, ...] = ("attn_out", "mlp_out", "head")


_ID = re.compile(r"^(?:(?P<embed>hook_embed)|blocks\.(?P<layer>\d+)\."
                 r"(?P<hook>hook_resid_pre|hook_attn_out|hook_mlp_out|attn\.hook_z|hook_resid_post))"
                 r"(?:\[(?P<head>\d+)\])?(?:@(?P<position>-\d+))?$")


@dataclass(frozen=True, order=True)
class Component:
    """One patchable activation: kind, layer, optional head, optional position.

    ``embed`` (token embeddings) has layer 0; ``resid_post`` is offered for the last layer only.
    ``position`` counts from the end of the prompt (-1 = last prompt token, where the refusal score is
    read); None patches every position at once.
    """

    kind: str
    layer: int
    head: int | None = None
    position: int | None = None

    @property
    def hook_name(self) -> str:
        return {
            "embed": "hook_embed",
            "resid_pre": f"blocks.{self.layer}.hook_resid_pre",
            "attn_out": f"blocks.{self.layer}.hook_attn_out",
            "mlp_out": f"blocks.{self.layer}.hook_mlp_out",
            "head": f"blocks.{self.layer}.attn.hook_z",
            "resid_post": f"blocks.{self.layer}.hook_resid_post",
        }[self.kind]

    @property
    def id(self) -> str:
        """Stable id: hook name, ``[head]`` for heads, ``@pos`` for one position (e.g. ``@-1``)."""
        head = f"[{self.head}]" if self.head is not None else ""
        pos = f"@{self.position}" if self.position is not None else ""
        return f"{self.hook_name}{head}{pos}"

    @classmethod
    def parse(cls, text: str) -> Component:
        """The component an :attr:`id` names (``blocks.2.attn.hook_z[0]@-1`` ...); ValueError if it names none."""
        m = _ID.match(text)
        if m is None:
            raise ValueError(f"'{text}' is no component id (e.g. blocks.2.hook_mlp_out, blocks.1.attn.hook_z[3]@-1)")
        position = int(m["position"]) if m["position"] is not None else None
        if m["embed"]:
            return cls("embed", 0, None, position)
        kind = "head" if m["hook"] == "attn.hook_z" else m["hook"].removeprefix("hook_")
        if (kind == "head") != (m["head"] is not None):
            raise ValueError(f"'{text}': a head id needs [head] after attn.hook_z, and only a head has one")
        return cls(kind, int(m["layer"]), int(m["head"]) if m["head"] is not None else None, position)

    @property
    def point(self) -> tuple[str, int]:
        """The hook point (kind, layer) whose activation this component patches."""
        return self.kind, self.layer


def enumerate_components(
    kinds: Iterable[str],
    n_layers: int,
    n_heads: int,
    max_positions: int,
    per_position: bool = True,
    all_positions: bool = True,
) -> list[Component]:
    """Every component of the given kinds: each layer (and head), all positions and/or each position."""
    positions: list[int | None] = []
    if all_positions:
        positions.append(None)
    if per_position:
        positions.extend(range(-max_positions, 0))
    return components_at(kinds, n_layers, n_heads, positions)


def components_at(
    kinds: Iterable[str], n_layers: int, n_heads: int, positions: Iterable[int | None]
) -> list[Component]:
    """Every component of the given kinds at each given position (None = all positions at once)."""
    positions = list(positions)
    out: list[Component] = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind '{kind}'; choose from {', '.join(KINDS)}")
        layers = {"resid_post": [n_layers - 1], "embed": [0]}.get(kind, range(n_layers))
        for layer in layers:
            heads: list[int | None] = list(range(n_heads)) if kind == "head" else [None]
            for head in heads:
                for position in positions:
                    out.append(Component(kind, layer, head, position))
    return out


def trivial_reason(component: Component, n_layers: int) -> str | None:
    """Why a component's patch is the whole input or output of the run by construction (None if it is not).

    Such a patch moves the score by the whole gap (or by exactly what the prompt's own tokens do) whatever the
    model computes, so it checks the engine but says nothing about where refusal is computed."""
    kind, layer, position = component.kind, component.layer, component.position
    if kind in ("embed", "resid_pre") and position is None:
        return "the whole input of the layer at every position: the other run's entire residual stream"
    if kind == "resid_post" and layer == n_layers - 1 and position in (None, -1):
        return "the final residual stream at the scored position: the other run's output"
    if kind == "embed" or (kind == "resid_pre" and layer == 0):
        return "the token swap itself: the other prompt's token embedding at this position"
    return None
