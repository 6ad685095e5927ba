"""Mini-V*: the generator writes V* Bench's layout, read_vstar reads it unchanged, the oracle holds."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from deepeyes_jax.data import choices, readers, synthetic_vstar

REPO = FIXTURES.parents[1]
SMALL = synthetic_vstar.SyntheticConfig(height=504, width=672, max_pixels=12544)  # 112x84 view, 6x down


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_vstar")
    meta = synthetic_vstar.write_dataset(root, 40, seed=3, cfg=SMALL)
    return root, meta


def test_layout_and_read_vstar_round_trip(small_set):
    root, meta = small_set
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["direct_attributes", "relative_position"]
    assert meta["counts"]["direct_attributes"] + meta["counts"]["relative_position"] == 40
    assert 0 < meta["counts"]["zoom_needed"] < 40
    items = list(readers.read_vstar(root))
    assert len(items) == 40 and all(it.error is None for it in items)
    for it in items:
        folder, stem = it.id.split("/")
        assert {p.name for p in (root / folder).glob(stem + ".*")} == {stem + ".png", stem + ".json"}
        ann = json.loads((root / folder / (stem + ".json")).read_text())
        f = it.fields
        assert f["category"] == folder and f["answer"] == "A" and f["options"] == ann["options"]
        assert f["question"] == choices.format_question(ann["question"], ann["options"])
        assert f["gt_boxes"] == [[x, y, x + w, y + h] for x, y, w, h in ann["bbox"]]
        assert len(ann["target_object"]) == len(ann["bbox"])
        assert len(f["options"]) == (4 if folder == "direct_attributes" else 2)
        assert len(set(f["options"])) == len(f["options"])
        with Image.open(root / folder / (stem + ".png")) as im:
            assert im.size == (672, 504) and im.mode == "RGB"
        for x, y, w, h in ann["bbox"]:
            assert min(w, h) > 30 and x >= 0 and y >= 0 and x + w <= 672 and y + h <= 504
        assert isinstance(ann["zoom_needed"], bool)
    assert synthetic_vstar.zoom_flags(root) == {
        k: a["zoom_needed"] for k, a in synthetic_vstar.read_annotations(root).items()}


def test_items_are_pure_functions_of_index_and_seed():
    a = synthetic_vstar.make_item(5, 1, SMALL)
    b = synthetic_vstar.make_item(5, 1, SMALL)
    c = synthetic_vstar.make_item(5, 2, SMALL)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[1], c[1])


def test_oracle_zoom_needed_at_chance_from_full_view_and_solved_from_crop(small_set):
    root, _ = small_set
    result = synthetic_vstar.oracle_check(root)
    assert set(result) == {"zoom_free/direct_attributes", "zoom_free/relative_position",
                           "zoom_needed/direct_attributes", "zoom_needed/relative_position"}
    for group, r in result.items():
        assert r["crop"] >= 0.95 and r["crop_swap"] > 100, (group, r)
        if group.startswith("zoom_needed"):
            # No target pixel of the full view is nearer a stripe colour than grey: every answer is a
            # guess, so accuracy is chance up to sampling noise (n is small here).
            assert r["full_view_decided"] == 0.0, (group, r)
            sigma = np.sqrt(r["chance"] * (1 - r["chance"]) / r["n"])
            assert abs(r["full_view"] - r["chance"]) <= 3.5 * sigma, (group, r)
            # By construction: drawing another answer changes the full view by a few grey levels.
            assert r["full_view_swap"] <= 8, (group, r)
        else:
            assert r["full_view"] >= 0.95 and r["full_view_decided"] == 1.0, (group, r)
            assert r["full_view_swap"] > 100, (group, r)


def test_oracle_sees_the_stripes_when_the_budget_keeps_them(small_set):
    # At a budget that does not downscale, the fine stripes are visible in the full view too: the
    # difficulty comes from the budget, not from the drawing.
    root, _ = small_set
    result = synthetic_vstar.oracle_check(root, max_pixels=672 * 504)
    assert result["zoom_needed/direct_attributes"]["full_view"] >= 0.95


def test_zoom_needed_detail_is_finer_than_the_downscale():
    assert SMALL.resized_hw == (84, 112) and SMALL.downscale == 6.0
    assert 2 * SMALL.fine_stripe < SMALL.downscale
    with pytest.raises(ValueError, match="downscaled only"):
        synthetic_vstar.SyntheticConfig(height=504, width=672, max_pixels=200704)
    with pytest.raises(ValueError, match="detail"):
        synthetic_vstar.SyntheticConfig(detail=1.5)
    with pytest.raises(ValueError, match="small_card"):
        synthetic_vstar.SyntheticConfig(small_card=(20, 40))


def test_launcher_writes_the_set_and_prints_the_oracle(tmp_path):
    out = tmp_path / "set"
    cmd = [sys.executable, "launch/make_vstar_synthetic.py", f"--output={out}", "--num=8", "--seed=1",
           "--width=672", "--height=504", "--max_pixels=12544"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 8 items" in proc.stdout and "gt crop" in proc.stdout
    meta = json.loads((out / synthetic_vstar.META_FILE).read_text())
    assert meta["num"] == 8 and "oracle" in meta and meta["resized_hw"] == [84, 112]
    assert len(list(readers.read_vstar(out))) == 8


def test_border_items_ask_what_only_the_full_view_shows_whole(tmp_path):
    cfg = synthetic_vstar.SyntheticConfig(height=756, width=1008, max_pixels=50176, layout="tiles",
                                          distractors=(1, 2), frame_tiles=True, border_frac=1.0,
                                          zoom_needed_frac=0.5, relative_frac=0.2)
    b = cfg.border_width
    borders = 0
    for i in range(30):
        folder, img, ann = synthetic_vstar.make_item(i, 0, cfg)
        syn = ann["synthetic"]
        ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                               img[:, -b:].reshape(-1, 3)])
        if "border" not in syn:  # zoom-needed and relative items: the tiles' tints reach the edge
            assert tuple(img[0, 0]) == synthetic_vstar.tile_tint(0, cfg.tiles)
            continue
        borders += 1
        colour = synthetic_vstar.BORDERS[syn["border"]]
        assert (ring == colour).all()  # the whole band, no card over it
        assert folder == "direct_attributes" and not ann["zoom_needed"] and syn["targets"] == []
        assert ann["options"][0] == syn["border"]
        assert sorted(ann["options"]) == sorted(synthetic_vstar.BORDERS)
        assert ann["bbox"] == [[0, 0, 1008, 756]] and ann["target_object"] == [synthetic_vstar.BORDER_TARGET]
        assert ann["question"] == "What color is the border of the picture?"
        for card in syn["cards"]:  # inside the band and in their frame's tile
            x, y, w, h = card["box"]
            assert b <= x and x + w <= 1008 - b and b <= y and y + h <= 756 - b
            assert card["tile"] == synthetic_vstar.FRAME_TILES[card["frame"]]
    assert 3 <= borders <= 15
    synthetic_vstar.write_dataset(tmp_path, 30, seed=0, cfg=cfg)
    oracle = synthetic_vstar.oracle_check(tmp_path)["zoom_free/direct_attributes"]
    assert oracle["n"] == borders and oracle["full_view"] == 1.0 and oracle["full_view_swap"] > 100
    assert oracle["crop_swap"] == 0  # a middle tile's crop holds none of the border
    with pytest.raises(ValueError, match="needs layout='tiles'"):
        synthetic_vstar.SyntheticConfig(border_frac=0.5)
    with pytest.raises(ValueError, match="a share"):
        synthetic_vstar.SyntheticConfig(layout="tiles", height=756, width=1008, border_frac=1.5)
