"""Pictures: PNG heatmaps and bars beside each report, their Markdown links, determinism, and `plot`."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refusal_eval.cli import main
from refusal_eval.compare import compare_reports, write_comparison
from refusal_eval.report.kinds import load_report
from refusal_eval.report.plots import (
    DIRECTION_PNG,
    HEADS_PNG,
    LAYERS_PNG,
    POSITIONS_PNG,
    Cell,
    Picture,
    _heads,
    _positions,
    audit_picture,
    direction_pictures,
    render_pictures,
)
from refusal_eval.report.writers import write_reports

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "reports" / "tiny-refuser" / "report.json"
# Pixel sizes written down here, not read from the module: a change of size is a visible change.
EXPECTED_PIXELS = {POSITIONS_PNG: (1400, 700), HEADS_PNG: (1200, 700), LAYERS_PNG: (1200, 500)}
LINKED = sorted([*EXPECTED_PIXELS, DIRECTION_PNG])  # the shipped report (schema 1.7) has a refusal direction
OLD = SHIPPED.parent.parent / "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora" / "report.json"  # schema 1.5


@pytest.fixture(scope="module")
def report():
    return load_report(SHIPPED)


@pytest.fixture(scope="module")
def pictures(report):
    return render_pictures(audit_picture(report))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)


def _strong_red(pixels: np.ndarray) -> int:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r > 150) & (g < 80) & (b < 80)).sum())


def _image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_every_picture_has_its_size_and_is_not_blank(pictures):
    assert set(pictures) == set(EXPECTED_PIXELS)
    for name, data in pictures.items():
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = _pixels(data)
        assert pixels.shape[1::-1] == EXPECTED_PIXELS[name], name
        assert pixels.var() > 100, f"{name} looks blank"
    # the tiny refuser's shares are large and positive at the last position: strong red cells must show
    assert _strong_red(_pixels(pictures[POSITIONS_PNG])) > 500


def test_same_report_gives_identical_bytes(report, pictures):
    again = render_pictures(audit_picture(report))
    assert again == pictures


def test_pictures_change_when_the_data_changes(report, pictures):
    changed = report.model_copy(deep=True)
    target = next(c for c in changed.components if c.kind == "attn_out" and c.position == -1 and c.layer == 2)
    target.share = -target.share - 0.5
    target.ci_low, target.ci_high = target.share - 0.1, target.share + 0.1
    redrawn = render_pictures(audit_picture(changed))
    assert redrawn[POSITIONS_PNG] != pictures[POSITIONS_PNG]
    assert redrawn[HEADS_PNG] == pictures[HEADS_PNG]  # no head changed


def _one_cell(significant: bool) -> Picture:
    cell = Cell("resid_pre", 0, None, -1, 0.9, 0.8, 1.0, significant)
    return Picture((cell,), "share of the gap", "one cell", {-1: "x"})


def _saturated(pixels: np.ndarray) -> int:
    return int((pixels.max(axis=-1) - pixels.min(axis=-1) > 80).sum())


def test_insignificant_cells_are_muted():
    bold, muted = (_pixels(render_pictures(_one_cell(s))[POSITIONS_PNG]) for s in (True, False))
    # the cell fills most of the panel: strongly coloured when significant, washed out when not (the colour bar,
    # the same in both, is the muted picture's only saturated area)
    assert _saturated(bold) > 10 * _saturated(muted)
    assert muted.mean() > bold.mean()  # lighter


def test_position_ticks_are_the_prompt_tokens(report):
    picture = audit_picture(report)
    figure = _positions(picture)
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    last = next(p for p in report.positions if p.position == -1)
    assert labels[-1].startswith("-1 ") and last.harmful_text.strip() in labels[-1]
    assert len(labels) == len({c.position for c in picture.cells if c.kind == "resid_pre" and c.position is not None
                               and c.position >= picture.first_offset})
    # heads: a layer x head panel per patched position family, plus one (layer.head) x position panel
    heads = _heads(picture)
    titles = [a.get_title() for a in heads.axes if a.get_label() != "<colorbar>"]
    assert titles == ["heads (hook_z), all positions", "heads (hook_z), last position",
                      "heads (hook_z) at each position"]


def test_reports_embed_their_pictures_and_every_link_resolves(tmp_path, report):
    json_path, md_path = write_reports(report, tmp_path)
    links = _image_links(md_path.read_text())
    assert sorted(links) == LINKED
    for link in links:
        assert (md_path.parent / link).is_file()
    # a later run whose shares are undefined leaves no stale picture and no link
    undefined = report.model_copy(deep=True, update={"shares_defined": False, "refusal_direction": None})
    write_reports(undefined, tmp_path)
    assert _image_links(md_path.read_text()) == []
    assert not any((md_path.parent / name).exists() for name in EXPECTED_PIXELS)


def test_no_pictures_option(tmp_path, report):
    _, md_path = write_reports(report, tmp_path, pictures=False)
    assert _image_links(md_path.read_text()) == [] and not list(md_path.parent.glob("*.png"))


def test_comparison_draws_differences(tmp_path, report):
    b = report.model_copy(deep=True)
    b.model.name, b.model.weights_sha256 = "tiny-refuser-b", "0" * 64
    for c in b.components:
        if c.id == "blocks.2.hook_resid_pre@-1":
            c.effects = [None if e is None else -e for e in c.effects]
    comparison = compare_reports(report, b, n_boot=200)
    _, md_path = write_comparison(comparison, tmp_path)
    links = _image_links(md_path.read_text())
    assert POSITIONS_PNG in links and all((tmp_path / link).is_file() for link in links)
    pixels = _pixels((tmp_path / POSITIONS_PNG).read_bytes())
    assert pixels.var() > 100
    blue = ((pixels[..., 2] > 120) & (pixels[..., 0] < 60)).sum()  # the flipped share: a strong negative change
    assert blue > 200


def test_plot_command_redraws_an_existing_report(tmp_path, capsys):
    folder = tmp_path / "tiny-refuser"
    folder.mkdir()
    shutil.copy(SHIPPED, folder / "report.json")
    assert main(["plot", str(folder / "report.json")]) == 0
    out = capsys.readouterr().out
    assert all(f"wrote {folder / name}" in out for name in EXPECTED_PIXELS)
    links = _image_links((folder / "report.md").read_text())
    assert sorted(links) == LINKED
    assert (folder / POSITIONS_PNG).read_bytes() == render_pictures(audit_picture(load_report(SHIPPED)))[
        POSITIONS_PNG]


@pytest.mark.parametrize("content, words", [("not json", "not valid JSON"), ("[1, 2]", "not a report object"),
                                            ('{"a": 1}', "does not match")])
def test_plot_command_bad_input_exits_2(tmp_path, capsys, content, words):
    bad = tmp_path / "report.json"
    bad.write_text(content)
    assert main(["plot", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and words in err and "Traceback" not in err


def test_the_refusal_direction_picture(tmp_path, report):
    """Drawn beside the others for a report with a refusal direction (the gate tests' small audit), the same bytes
    every time, removed when a later report has none; a report of schema 1.5 has none."""
    from tests.test_gate import small_audit

    assert direction_pictures(load_report(OLD)) == {}
    fresh = small_audit()
    drawn = direction_pictures(fresh)
    assert set(drawn) == {DIRECTION_PNG} and direction_pictures(fresh) == drawn
    pixels = _pixels(drawn[DIRECTION_PNG])
    assert pixels.shape[:2] == (500, 1200) and pixels.var() > 100
    orange = ((pixels[..., 0] > 180) & (pixels[..., 1] > 60) & (pixels[..., 1] < 120) & (pixels[..., 2] < 60)).sum()
    assert orange > 500  # the addition bars
    _, md_path = write_reports(fresh, tmp_path)
    assert DIRECTION_PNG in _image_links(md_path.read_text()) and (md_path.parent / DIRECTION_PNG).is_file()
    write_reports(fresh.model_copy(update={"refusal_direction": None}), tmp_path)
    assert not (md_path.parent / DIRECTION_PNG).exists()
    assert DIRECTION_PNG not in _image_links(md_path.read_text())
