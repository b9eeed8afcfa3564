"""Planted refusal: positive controls whose mechanism is known by construction, and how well an audit recovers it.

A **planted organism** is a base model that does not refuse, with refusal fitted by weights that all lie inside a
known module set (a LoRA whose ``target_modules`` name one layer's projections; for heads, a LoRA on that layer's
``o_proj`` whose ``lora_A`` reads only those heads' input columns). Every other weight is the base's, so the refusal
the audit sees can only come from the planted modules, or from upstream components feeding them the harmful
signal (they may legitimately carry share, and are reported, never tuned away).

A plant is written as **sites**: ``mlp:L`` (gate, up and down projections of layer L), ``attn:L`` (q, k, v and o of
layer L) and ``heads:L:h,h`` (layer L's ``o_proj``, masked to heads h). Its components use the report's own ids
(``blocks.L.hook_mlp_out``, ``blocks.L.hook_attn_out``, ``blocks.L.attn.hook_z[h]``, every position), its modules the
Hugging Face Llama-family names (``model.layers.L.mlp`` ...). Both are saved as ``planted.json`` beside the model or
adapter.

:func:`recovery` scores one audit report against a plant: the planted component's rank, the AUROC of its shares
ranking planted against unplanted components, precision and recall of what the audit names, and the other
components it names. :func:`joint_shares` measures the planted set patched together (a real joint patch).
The criteria they are held to are in BENCHMARKS.md, "Planted refusal".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refusal_eval.errors import ConfigError, DataError
from refusal_eval.patching.components import WRITER_KINDS, Component

PLANTED_FILE = "planted.json"
_PROJECTIONS = {"mlp": ("gate_proj", "up_proj", "down_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "heads": ("o_proj",)}
_SITE = re.compile(r"^(mlp|attn):(\d+)$|^heads:(\d+):(\d+(?:,\d+)*)$")


@dataclass(frozen=True)
class Site:
    """One planted module: an MLP, an attention block, or some heads of one layer."""

    part: Literal["mlp", "attn", "heads"]
    layer: int
    heads: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Site:
        m = _SITE.match(text.strip())
        if m is None:
            raise ConfigError(f"plant site '{text}': write mlp:LAYER, attn:LAYER or heads:LAYER:H,H (e.g. heads:2:0,2)")
        if m.group(1):
            return cls(m.group(1), int(m.group(2)))
        heads = tuple(int(h) for h in m.group(4).split(","))
        if len(set(heads)) != len(heads):
            raise ConfigError(f"plant site '{text}': a head is named twice")
        return cls("heads", int(m.group(3)), tuple(sorted(heads)))

    def __str__(self) -> str:
        return f"heads:{self.layer}:{','.join(map(str, self.heads))}" if self.part == "heads" else \
            f"{self.part}:{self.layer}"

    @property
    def components(self) -> list[Component]:
        """The report's components this site's weights write (every position)."""
        if self.part == "heads":
            return [Component("head", self.layer, h) for h in self.heads]
        return [Component("mlp_out" if self.part == "mlp" else "attn_out", self.layer)]

    @property
    def module(self) -> str:
        return {"mlp": f"model.layers.{self.layer}.mlp", "attn": f"model.layers.{self.layer}.self_attn",
                "heads": f"model.layers.{self.layer}.self_attn.o_proj"}[self.part]

    @property
    def projections(self) -> list[str]:
        """The Linear modules a LoRA on this site wraps (full names)."""
        parent = self.module.rsplit(".", 1)[0] if self.part == "heads" else self.module
        return [f"{parent}.{p}" for p in _PROJECTIONS[self.part]]

    def holds(self, c: Component) -> bool:
        """Whether the component lies inside this site's module (the module itself, or one of its parts)."""
        if c.layer != self.layer or c.kind not in ("attn_out", "mlp_out", "head"):
            return False
        if self.part == "mlp":
            return c.kind == "mlp_out"
        if self.part == "attn":
            return c.kind in ("attn_out", "head")
        return c.kind == "head" and c.head in self.heads


class Planted(BaseModel):
    """``planted.json``: what was planted, in the report's component ids and the model's module names."""

    model_config = ConfigDict(extra="forbid")
    components: list[str] = Field(description="planted components, the report's ids, every position")
    modules: list[str] = Field(description="the modules whose weights were trained (Hugging Face names)")
    sites: list[str] = Field(description="the plant as sites: mlp:L, attn:L, heads:L:h,h")
    name: str = ""
    base: str = Field("", description="the model the plant was fitted on")

    @classmethod
    def of(cls, sites: Sequence[Site], name: str = "", base: str = "") -> Planted:
        return cls(components=[c.id for s in sites for c in s.components], modules=[s.module for s in sites],
                   sites=[str(s) for s in sites], name=name, base=base)

    @property
    def site_list(self) -> list[Site]:
        return [Site.parse(s) for s in self.sites]

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / PLANTED_FILE
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        return path


def load_planted(path: str | Path) -> Planted:
    """Read ``planted.json`` (or the folder holding it); DataError names the file and the field."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANTED_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; a planted organism keeps its plant in {PLANTED_FILE}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
    try:
        planted = Planted.model_validate(raw)
        sites = planted.site_list
    except ValidationError as e:
        first = e.errors()[0]
        raise DataError(f"{path}: field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None
    except ConfigError as e:
        raise DataError(f"{path}: {e}") from None
    expected = Planted.of(sites, planted.name, planted.base)
    if expected.components != planted.components or expected.modules != planted.modules:
        raise DataError(f"{path}: 'components' and 'modules' do not match 'sites' {planted.sites} (expected "
                        f"{expected.components} and {expected.modules})")
    return planted


# -- scoring an audit against a plant --------------------------------------------------------------------------------
class Recovery(BaseModel):
    """How one audit report recovers one plant (BENCHMARKS.md, "Planted refusal": criteria 2 and the reported
    measures; the joint share is :func:`joint_shares`)."""

    method: str
    direction: str
    ranked: int = Field(description="components ranked: non-trivial attn_out, mlp_out and heads, every position, "
                        "outside the plant's own parts")
    planted_ranks: dict[str, int | None] = Field(description="each planted component's rank by share (1 = largest)")
    top: str | None = Field(description="the component with the largest share among those ranked")
    rank_one: bool = Field(description="criterion 2: a planted component has the largest share")
    auroc: float | None = Field(description="AUROC of the shares ranking planted against unplanted components")
    named: list[str] = Field(description="what the audit names: significant components (exact, verified cells), else "
                             "the top-k estimates, k = the number of planted components")
    named_rule: str
    precision: float | None
    recall: float
    named_unplanted: list[str] = Field(description="components named that are not planted and hold no plant")
    shares: dict[str, float | None] = Field(description="each planted component's single share")


def _label(c: Component, sites: Sequence[Site], planted_ids: set[str]) -> str:
    """planted, inside (part of a planted module, not itself planted), holds (contains a planted component),
    unplanted."""
    if Component(c.kind, c.layer, c.head).id in planted_ids:
        return "planted"
    if any(s.holds(c) for s in sites):
        return "inside"
    if c.kind == "attn_out" and any(s.part == "heads" and s.layer == c.layer for s in sites):
        return "holds"
    return "unplanted"


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a positive outranks a negative), ties half: the Mann-Whitney U over n_pos * n_neg (scipy.stats)."""
    if not len(positive) or not len(negative):
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(positive, negative, alternative="two-sided").statistic / (len(positive) * len(negative)))


def recovery(report, planted: Planted) -> Recovery:
    """Score one audit report (any method; shares defined; components at every position) against a plant."""
    if not report.shares_defined:
        raise DataError(f"report of {report.model.name}: its shares are undefined ({report.shares_reason}); "
                        "recovery needs a refusing organism")
    sites = planted.site_list
    planted_ids = set(planted.components)
    rows = [(r, Component(r.kind, r.layer, r.head, r.position)) for r in report.components]
    rows = [(r, c) for r, c in rows if c.kind in WRITER_KINDS and c.position is None and r.trivial is None
            and r.share is not None]
    labels = {r.id: _label(c, sites, planted_ids) for r, c in rows}
    ranked = sorted((r for r, _ in rows if labels[r.id] != "inside"), key=lambda r: -r.share)
    rank_of = {r.id: i + 1 for i, r in enumerate(ranked)}
    scored = [r for r in ranked if labels[r.id] in ("planted", "unplanted")]
    exact = not any(r.approximate for r, _ in rows)
    if any(not r.approximate for r in ranked):  # exact patches, or attribution with verified cells
        named = [r.id for r in scored if r.measured_significant]
        rule = "significant components (exact patches)" if exact else "significant verified cells"
    else:
        named = [r.id for r in scored][: len(planted_ids)]
        rule = f"the top {len(planted_ids)} attribution estimates (an estimate is never significant)"
    hits = [i for i in named if labels[i] == "planted"]
    return Recovery(
        method=report.config.get("method", "exact"), direction=report.direction, ranked=len(ranked),
        planted_ranks={i: rank_of.get(i) for i in planted.components},
        top=ranked[0].id if ranked else None, rank_one=bool(ranked) and labels[ranked[0].id] == "planted",
        auroc=auroc([r.share for r in scored if labels[r.id] == "planted"],
                    [r.share for r in scored if labels[r.id] == "unplanted"]),
        named=named, named_rule=rule, precision=len(hits) / len(named) if named else None,
        recall=len(hits) / len(planted_ids), named_unplanted=[i for i in named if labels[i] == "unplanted"],
        shares={i: next((r.share for r, _ in rows if r.id == i), None) for i in planted.components},
    )


class JointShare(BaseModel):
    direction: str
    components: list[str]
    share: float
    ci_low: float
    ci_high: float
    n_pairs: int


def joint_shares(report, report_path: str | Path, sets: dict[str, Sequence[str]], directions=("noise",),
                 model: str | None = None, adapter: str | None = None) -> dict[str, list[JointShare]]:
    """Each named set of component ids (every position) patched together, per direction, on the report's pairs of
    equal token length, with a pair-bootstrap CI: ``{name: [JointShare per direction]}``."""
    from refusal_eval.circuit import Search, _interval, prepare

    setup = prepare(report, report_path, model=model, adapter=adapter, family="all")
    out: dict[str, list[JointShare]] = {name: [] for name in sets}
    parsed = {name: [Component.parse(i) for i in ids] for name, ids in sets.items()}
    for direction in directions:
        search = Search(setup.engine, setup.batch, setup.m_h, setup.m_b, direction)
        effects = search.effects(list(parsed.values()))
        intervals = _interval(effects, search.gaps, report.stats.level, report.stats.n_resamples, report.stats.seed)
        for (name, ids), iv in zip(sets.items(), intervals, strict=True):
            out[name].append(JointShare(direction=direction, components=list(ids), share=iv.share,
                                        ci_low=iv.ci_low, ci_high=iv.ci_high, n_pairs=setup.batch.n_pairs))
    return out


def masked_columns(site: Site, head_dim: int, in_features: int) -> np.ndarray:
    """For a heads site: a 0/1 mask over ``o_proj``'s input columns, 1 on the planted heads' slices."""
    mask = np.zeros(in_features, dtype=np.float32)
    for h in site.heads:
        if (h + 1) * head_dim > in_features:
            raise ConfigError(f"plant site '{site}': head {h} is past the layer's {in_features // head_dim} heads")
        mask[h * head_dim:(h + 1) * head_dim] = 1.0
    return mask
