"""Pictures of a report: where refusal lives at a glance (matplotlib's Agg canvas, no display needed).

Three PNGs, drawn from a report alone (no model), for an audit (shares) or a comparison (B − A differences):

* ``positions.png``: layer × position heatmaps of ``resid_pre``, ``attn_out`` and ``mlp_out``; the x tick labels
  are the prompt tokens at each offset from the end (from the report's position table);
* ``heads.png``: layer × head heatmaps, one panel per patched position (all positions, last, ...);
* ``layers.png``: per-layer bars of the all-position shares with their confidence intervals as error bars (the
  last position's when the audit patched no all-position components);
* ``direction.png`` (audits with a refusal direction): every layer's candidate direction at the chosen position,
  its ablation (necessity) and addition (sufficiency) shares of the gap with their CIs, the chosen layer, the top
  writers' layers and the layers the late-layer filter excludes marked.

Colours: one diverging, colour-blind-safe map (ColorBrewer RdBu) centred on 0 and shared by a figure's panels,
with a labelled colour bar; cells and bars that are not significant (family-wise) are hatched and lightened, so
the eye lands on what the statistics support; attribution estimates (never significant) are hatched too, and their
bars have no error bar. A report whose shares are undefined gets no pictures: there is
nothing they could honestly show.

Output is deterministic: the figure size, dpi, fonts and every drawing choice are fixed, and the PNG carries no
software or date stamp, so the same report gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

POSITIONS_PNG, HEADS_PNG, LAYERS_PNG, DIRECTION_PNG = "positions.png", "heads.png", "layers.png", "direction.png"
PICTURE_NAMES = (POSITIONS_PNG, HEADS_PNG, LAYERS_PNG, DIRECTION_PNG)
DPI = 100
SIZES = {POSITIONS_PNG: (14.0, 7.0), HEADS_PNG: (12.0, 7.0), LAYERS_PNG: (12.0, 5.0),
         DIRECTION_PNG: (12.0, 5.0)}  # inches; x DPI = pixels
HEATMAP_KINDS = ("resid_pre", "attn_out", "mlp_out")
BAR_KINDS = ("embed", "resid_pre", "attn_out", "mlp_out", "resid_post")
KIND_COLOURS = {"embed": "#555555", "resid_pre": "#0072B2", "attn_out": "#E69F00", "mlp_out": "#009E73",
                "resid_post": "#CC79A7"}  # Okabe-Ito, colour-blind safe
MAX_TICKS = 32
_STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "hatch.linewidth": 0.6,
          "hatch.color": "#7f7f7f", "savefig.dpi": DPI, "figure.dpi": DPI}


@dataclass(frozen=True)
class Cell:
    """One component's number as drawn: a share (audit) or a share difference (comparison)."""

    kind: str
    layer: int
    head: int | None
    position: int | None
    value: float
    low: float | None
    high: float | None
    significant: bool


@dataclass(frozen=True)
class Picture:
    """What to draw: the cells, the quantity's name, and the token label of each position offset."""

    cells: tuple[Cell, ...]
    quantity: str
    title: str
    position_labels: dict[int, str]
    first_offset: int | None = None  # offsets before it are identical on both sides (exact zeros): not drawn


def audit_picture(report) -> Picture | None:
    """The audit's shares as cells (trivial patches left out); None when shares are undefined. An attribution
    estimate (``approximate``) is drawn as not significant and without an interval, whatever an older report says."""
    defined = report.gap.separated if report.shares_defined is None else report.shares_defined
    cells = tuple(
        Cell(c.kind, c.layer, c.head, c.position, c.share, None, None, False) if c.approximate else
        Cell(c.kind, c.layer, c.head, c.position, c.share, c.ci_low, c.ci_high, bool(c.significant))
        for c in report.components if c.share is not None and c.trivial is None
    )
    if not defined or not cells:
        return None
    labels = {}
    for p in report.positions:
        h, b = p.harmful_text.strip() or repr(p.harmful_text), p.benign_text.strip() or repr(p.benign_text)
        labels[p.position] = h if h == b else f"{h} / {b}"
    first = min((p.first_diff_offset for p in report.pairs if p.used and p.first_diff_offset is not None),
                default=None)
    return Picture(cells, "share of the gap", f"{report.model.name} ({report.direction})", labels, first)


def comparison_picture(comparison) -> Picture | None:
    """A comparison's share differences (B − A) as cells; None when it compared no components."""
    cells = tuple(Cell(c.kind, c.layer, c.head, c.position, c.diff, c.ci_low, c.ci_high, c.significant)
                  for c in comparison.components)
    if not cells:
        return None
    return Picture(cells, "share in B − share in A", f"{comparison.a.name} → {comparison.b.name}", {})


CAPTIONS = {
    POSITIONS_PNG: "layer × position heatmaps of the residual stream, attention output and MLP output",
    HEADS_PNG: "layer × head heatmaps of the attention heads",
    LAYERS_PNG: "per-layer bars with confidence intervals",
    DIRECTION_PNG: "the refusal direction: every layer's candidate ablated and added, shares of the gap with "
    "confidence intervals",
}


def markdown_section(names) -> list[str]:
    """The Markdown lines that embed the pictures written beside the page (none: no section)."""
    names = [n for n in PICTURE_NAMES if n in set(names)]
    if not names:
        return []
    lines = ["## Pictures", "",
             "Colours are centred on 0; hatched, lighter cells and bars are not significant (family-wise). "
             "`refusal-eval plot` redraws them from the JSON.", ""]
    for name in names:
        lines += [f"![{CAPTIONS[name]}]({name})", ""]
    return lines


def render_pictures(picture: Picture | None) -> dict[str, bytes]:
    """PNG bytes by file name, for each picture the cells allow (none for ``None``)."""
    if picture is None:
        return {}
    import matplotlib  # drawn on Figure + FigureCanvasAgg directly: no pyplot, the user's backend is left alone

    out = {}
    with matplotlib.rc_context(_STYLE):
        for name, draw in ((POSITIONS_PNG, _positions), (HEADS_PNG, _heads), (LAYERS_PNG, _layers)):
            figure = draw(picture)
            if figure is not None:
                out[name] = _png(figure)
    return out


def _figure(name: str):
    from matplotlib.figure import Figure

    return Figure(figsize=SIZES[name], dpi=DPI, layout="constrained")


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _limit(values: Iterable[float]) -> float:
    largest = max((abs(v) for v in values), default=0.0)
    return largest if largest > 0 else 1.0


def _thin(ticks: list, labels: list[str]) -> tuple[list, list[str]]:
    """At most MAX_TICKS labelled ticks, evenly spaced, the last one always kept."""
    step = max(1, -(-len(ticks) // MAX_TICKS))
    keep = sorted(set(range(len(ticks) - 1, -1, -step)))
    return [ticks[i] for i in keep], [labels[i] for i in keep]


def _heatmap(axes, grid, mask, row_labels: list[str], col_labels: list[str], limit: float, title: str,
             xlabel: str, ylabel: str):
    """One panel: diverging colours centred on 0, non-significant cells hatched and lightened, no cell grey."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit, origin="lower",
                        aspect="auto", interpolation="nearest")
    for (i, j), muted in np.ndenumerate(mask):
        if muted:
            axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=(1, 1, 1, 0.55), edgecolor="#7f7f7f",
                                     hatch="////", linewidth=0))
    xt, xl = _thin(list(range(len(col_labels))), col_labels)
    axes.set_xticks(xt, xl, rotation=90)
    yt, yl = _thin(list(range(len(row_labels))), row_labels)
    axes.set_yticks(yt, yl)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    return image


def _offset_labels(picture: Picture, offsets: list[int]) -> list[str]:
    return [f"{p} {picture.position_labels[p]}" if p in picture.position_labels else str(p) for p in offsets]


def _grid(cells: list[Cell], row_of, col_of, rows: list, cols: list):
    import numpy as np

    grid = np.full((len(rows), len(cols)), np.nan)
    mask = np.zeros((len(rows), len(cols)), dtype=bool)
    r_index, c_index = {r: i for i, r in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
    for c in cells:
        i, j = r_index[row_of(c)], c_index[col_of(c)]
        grid[i, j], mask[i, j] = c.value, not c.significant
    return grid, mask


def _colour_bar(figure, image, axes_list, picture: Picture) -> None:
    bar = figure.colorbar(image, ax=axes_list, shrink=0.9, pad=0.02)
    bar.set_label(f"{picture.quantity} (hatched: not significant, family-wise; grey: not patched or a trivial patch)")


def _positions(picture: Picture):
    kinds = [k for k in HEATMAP_KINDS
             if any(c.kind == k and c.head is None and c.position is not None for c in picture.cells)]
    if not kinds:
        return None
    chosen = [c for c in picture.cells if c.kind in kinds and c.head is None and c.position is not None
              and (picture.first_offset is None or c.position >= picture.first_offset)]
    if not chosen:
        return None
    offsets = sorted({c.position for c in chosen})
    layers = sorted({c.layer for c in chosen})
    labels = _offset_labels(picture, offsets)
    limit = _limit(c.value for c in chosen)
    figure = _figure(POSITIONS_PNG)
    axes_list = figure.subplots(1, len(kinds), squeeze=False)[0].tolist()
    image = None
    for axes, kind in zip(axes_list, kinds, strict=True):
        grid, mask = _grid([c for c in chosen if c.kind == kind], lambda c: c.layer, lambda c: c.position,
                           layers, offsets)
        image = _heatmap(axes, grid, mask, [str(x) for x in layers], labels, limit, kind,
                         "position from the end (token)", "layer")
    figure.suptitle(f"{picture.title}: {picture.quantity}, layer × position")
    _colour_bar(figure, image, axes_list, picture)
    return figure


def _position_name(position: int | None) -> str:
    return "all positions" if position is None else "last position" if position == -1 else f"position {position}"


def _heads(picture: Picture):
    """Layer × head panels for all positions and the last position; heads patched at more positions get one more
    panel, (layer.head) × position."""
    heads = [c for c in picture.cells if c.kind == "head"
             and (c.position is None or picture.first_offset is None or c.position >= picture.first_offset)]
    if not heads:
        return None
    groups = [p for p in (None, -1) if any(c.position == p for c in heads)]
    offsets = sorted({c.position for c in heads if c.position is not None})
    layers = sorted({c.layer for c in heads})
    n_heads = max(c.head for c in heads) + 1
    limit = _limit(c.value for c in heads)
    figure = _figure(HEADS_PNG)
    n_panels = len(groups) + (len(offsets) > 1)
    axes_list = figure.subplots(1, n_panels, squeeze=False)[0].tolist()
    image = None
    for axes, position in zip(axes_list, groups, strict=False):
        grid, mask = _grid([c for c in heads if c.position == position], lambda c: c.layer, lambda c: c.head,
                           layers, list(range(n_heads)))
        image = _heatmap(axes, grid, mask, [str(x) for x in layers], [str(h) for h in range(n_heads)], limit,
                         f"heads (hook_z), {_position_name(position)}", "head", "layer")
    if len(offsets) > 1:
        rows = sorted({(c.layer, c.head) for c in heads if c.position is not None})
        grid, mask = _grid([c for c in heads if c.position is not None], lambda c: (c.layer, c.head),
                           lambda c: c.position, rows, offsets)
        image = _heatmap(axes_list[-1], grid, mask, [f"{layer}.{head}" for layer, head in rows],
                         _offset_labels(picture, offsets), limit, "heads (hook_z) at each position",
                         "position from the end (token)", "layer.head")
    figure.suptitle(f"{picture.title}: {picture.quantity}, layer × head")
    _colour_bar(figure, image, axes_list, picture)
    return figure


def _layers(picture: Picture):
    import numpy as np

    for position in (None, -1):
        bars = [c for c in picture.cells if c.kind in BAR_KINDS and c.head is None and c.position == position]
        if bars:
            break
    else:
        return None
    kinds = [k for k in BAR_KINDS if any(c.kind == k for c in bars)]
    layers = sorted({c.layer for c in bars})
    x_of = {layer: i for i, layer in enumerate(layers)}
    width = 0.8 / len(kinds)
    figure = _figure(LAYERS_PNG)
    axes = figure.subplots()
    for k, kind in enumerate(kinds):
        cells = sorted((c for c in bars if c.kind == kind), key=lambda c: c.layer)
        x = np.array([x_of[c.layer] for c in cells]) + (k - (len(kinds) - 1) / 2) * width
        values = np.array([c.value for c in cells])
        low = np.array([c.value - c.low if c.low is not None else 0.0 for c in cells])
        high = np.array([c.high - c.value if c.high is not None else 0.0 for c in cells])
        colour = KIND_COLOURS[kind]
        significant = np.array([c.significant for c in cells])
        for keep, alpha, hatch, label in ((significant, 1.0, None, kind), (~significant, 0.35, "////", None)):
            if keep.any():
                axes.bar(x[keep], values[keep], width, color=colour, alpha=alpha, hatch=hatch, label=label,
                         edgecolor=colour if hatch else None, linewidth=0)
        axes.errorbar(x, values, yerr=np.vstack([low, high]), fmt="none", ecolor="#222222", elinewidth=0.8,
                      capsize=1.5)
        if not significant.any():
            axes.bar([], [], color=colour, label=kind)  # legend entry for a kind with no significant bar
    axes.axhline(0, color="#222222", linewidth=0.6)
    xt, xl = _thin(list(range(len(layers))), [str(layer) for layer in layers])
    axes.set_xticks(xt, xl)
    axes.set_xlabel("layer")
    axes.set_ylabel(f"{picture.quantity} (CI as error bars)")
    axes.legend(loc="upper left", ncols=len(kinds), frameon=False)
    axes.set_title(f"{picture.title}: {picture.quantity} per layer, {_position_name(position)} patched "
                   "(light and hatched: not significant, family-wise)")
    return figure


DIRECTION_COLOURS = {"ablation": "#0072B2", "addition": "#D55E00"}  # Okabe-Ito


def direction_pictures(report) -> dict[str, bytes]:
    """``direction.png`` by name for a report with a refusal direction (none for one without)."""
    d = getattr(report, "refusal_direction", None)
    if d is None or not d.computed or not d.layers:
        return {}
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        return {DIRECTION_PNG: _png(_direction(d, report.model.name))}


def report_pictures(report) -> dict[str, bytes]:
    """Every picture of an audit report: the shares' (:func:`render_pictures`) and the refusal direction's."""
    return {**render_pictures(audit_picture(report)), **direction_pictures(report)}


def _direction(d, name: str):
    """Per layer, the candidate at the chosen position: ablation and addition shares with CIs as error bars; the
    chosen layer dashed, the top writers' layers marked above, the layers the late-layer filter excludes shaded."""
    import re

    import numpy as np

    figure = _figure(DIRECTION_PNG)
    axes = figure.subplots()
    layers = [x.layer for x in d.layers]
    if d.filters is not None and d.filters.late_layer_start <= max(layers):
        axes.axvspan(d.filters.late_layer_start - 0.5, max(layers) + 0.5, color="#e5e5e5", linewidth=0,
                     label="excluded by the late-layer filter")
    for k, (what, field) in enumerate((("ablation", "ablation"), ("addition", "addition"))):
        rows = [(x.layer, getattr(x, field)) for x in d.layers if getattr(x, field) is not None]
        if not rows:
            continue
        x = np.array([layer for layer, _ in rows]) + (k - 0.5) * 0.38
        values = np.array([e.estimate for _, e in rows])
        err = np.vstack([values - np.array([e.ci_low for _, e in rows]),
                         np.array([e.ci_high for _, e in rows]) - values])
        label = "ablation (necessity)" if what == "ablation" else "addition (sufficiency)"
        axes.bar(x, values, 0.38, color=DIRECTION_COLOURS[what], label=label, linewidth=0)
        axes.errorbar(x, values, yerr=err, fmt="none", ecolor="#222222", elinewidth=0.8, capsize=2)
    axes.axhline(0, color="#222222", linewidth=0.6)
    for x in d.layers:
        if x.ablation is None and x.addition is None:
            axes.text(x.layer, 0, "difference in means 0", ha="center", va="bottom", fontsize=8, color="#555555")
    low, high = axes.get_ylim()
    axes.set_ylim(low, high + 0.3 * (high - low))  # room for the legend above the bars
    axes.axvline(d.layer, color="#222222", linestyle="--", linewidth=1.0, label=f"chosen: layer {d.layer}")
    top = sorted({int(m.group(1)) for c in d.cosines if (m := re.match(r"blocks\.(\d+)\.", c.component))})
    if top:
        axes.plot(top, [1.02] * len(top), linestyle="none", marker="v", color="#009E73", markersize=8,
                  transform=axes.get_xaxis_transform(), clip_on=False, label="top writers' layers")
    xt, xl = _thin(layers, [str(layer) for layer in layers])
    axes.set_xticks(xt, xl)
    axes.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
    axes.set_xlabel(f"layer (the candidate at position {d.position})")
    axes.set_ylabel(f"share of the gap on the {len(d.rank_pair_ids)} ranking pairs" if d.rank_pair_ids else
                    "share of the gap (CI as error bars)")
    axes.legend(loc="upper left", frameon=False, ncols=3)
    axes.set_title(f"{name}: refusal direction per layer, ablated everywhere and added at the layer", pad=22)
    return figure
