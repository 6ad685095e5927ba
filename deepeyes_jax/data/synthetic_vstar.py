"""Mini-V*: synthetic V*-Bench-style questions whose deciding detail vanishes at the image budget.

The items are written in V* Bench's folder format (`readers.read_vstar` reads them unchanged): a root
with `direct_attributes/` and `relative_position/`, each `syn_00012.png` beside `syn_00012.json` holding
`target_object`, `bbox` ([x, y, w, h] per target), `question` and `options` (the first is correct), plus
`zoom_needed` and a `synthetic` block (every card drawn) that the reader ignores.

A scene is a dark smooth background with a few "cards": a coloured frame around stripes alternating
between two colours complementary about mid-grey (red/cyan, green/magenta, blue/yellow, orange/azure).
Every pair averages to the same grey, so stripes finer than the downscale factor `f` (original pixels
per pixel after smart_resize at `max_pixels`) are averaged away by the processor's antialiased bicubic
resize, whatever the pair: the full view shows a grey card, the crop shows the stripes. The difficulty
knob is `detail` (stripe period / f, default 0.8) for zoom-needed cards; zoom-free cards are large, with
stripes tens of resized pixels wide. Question kinds, as in V*:

- `direct_attributes`: "Which two colors make up the stripes on the card with the gold frame?",
  options A-D (the four pairs). The frame colour, visible in the full view, locates the card among
  distractor cards with other frames; the target's box is the ground truth.
- `relative_position`: "Is the card with red and cyan stripes on the left or right side of the card
  with blue and yellow stripes?" (or above/below), two options. Two white-framed cards; from the full
  view they look alike. Both boxes are ground truth; zoom-needed pairs fit in one crop.
- with `border_frac` (layout "tiles", off by default), zoom-free attribute items ask "What color is the
  border of the picture?": a band around the whole image in one of four colours (`BORDERS`), the
  cards kept inside it. The full view shows the band all round; a crop of one tile shows a strip of it
  at most. The ground-truth box is the whole image.

`oracle_check` shows it: it processes the full image exactly as the processor would (`smart_resize` +
PIL bicubic), reads the stripe pair of each target card by nearest-colour votes (a guess when no pixel is
nearer a stripe colour than a neutral), and does the same on the ground-truth crop. Zoom-needed items
come out at chance from the full view and near 100% from the crop; zoom-free items are answered from the
full view. By construction, redrawing a zoom-needed target with another answer changes the full view by
a few grey levels only (hundreds in the crop): no observer can do better than chance there.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from deepeyes_jax.processing.image import smart_resize

RGB = tuple[int, int, int]
PAIRS: dict[str, tuple[RGB, RGB]] = {
    "red and cyan": ((224, 32, 32), (32, 224, 224)),
    "green and magenta": ((32, 224, 32), (224, 32, 224)),
    "blue and yellow": ((32, 32, 224), (224, 224, 32)),
    "orange and azure": ((224, 128, 32), (32, 128, 224)),
}
# Frame colours are named with words no stripe pair uses, so the one frame word of an attribute question
# is the card it asks about (its options list all four pairs: with shared words, "red" would be both).
# A model then reads the asked card by what the word is, not by where it stands (BENCHMARKS.md, Mini-V*
# seventh runs: with shared words the tiny model never read it).
FRAMES: dict[str, RGB] = {"crimson": (235, 40, 40), "lime": (40, 200, 70), "cobalt": (60, 90, 255),
                          "gold": (250, 230, 40), "white": (250, 250, 250), "purple": (170, 70, 230)}
# With `frame_tiles`, the tile (row-major in the 4 x 3 lattice) each frame colour's card sits in: two per
# row, spread over the columns.
FRAME_TILES: dict[str, int] = {"crimson": 0, "lime": 2, "cobalt": 5, "gold": 7, "white": 8, "purple": 10}
# Colours of the picture's border (`border_frac`): named with words no frame or stripe pair uses, bright
# against the dark tiles, told apart in the full view by a vision tower trained for minutes.
BORDERS: dict[str, RGB] = {"pink": (250, 140, 200), "teal": (0, 170, 160), "olive": (150, 150, 30),
                           "silver": (200, 200, 215)}
BORDER_TARGET = "border of the picture"
NEUTRALS: tuple[RGB, ...] = ((128, 128, 128), (250, 250, 250), (0, 0, 0))
META_FILE = "synthetic_vstar.json"
ZOOM_MIN_SIDE = 31  # the crop tool accepts boxes with min side > 30 px


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """How items are drawn.

    Attributes:
      height, width: image size in pixels.
      max_pixels, min_pixels, factor: the image budget of the model (its processor's smart_resize).
      zoom_needed_frac: share of zoom-needed items; relative_frac: share of relative-position items.
      small_card: side range (px) of zoom-needed cards (>= 31: a crop of one must be a valid zoom).
      large_card: side range of zoom-free cards as a fraction of the shorter image side.
      detail: stripe period of zoom-needed cards in units of the downscale factor (< 1: averaged away).
      distractors: range of distractor cards in attribute scenes.
      max_gap: largest gap (px) between the two cards of a zoom-needed relative item.
      layout: "free" (cards anywhere, the sizes above) or "tiles": the image is a `tiles` (columns,
        rows) lattice; each card fills `tile_fill` of its tile's shorter side, and each tile has its own
        flat dark background tint (see `tile_tint`). Relative items are then always zoom-free (two cards
        in one crop would not be resolved), and the tool's natural coarse box is a tile.
      frame_tiles: (layout="tiles", 4 x 3) attribute scenes put each card in its frame colour's own tile
        (`FRAME_TILES`), so where the card a question names sits is a fact to recall, not a visual
        search. The Mini-V* model, trained from scratch for minutes, cannot learn visual search;
        which card to look at, and when, is still its to find.
      border_frac: (layout="tiles") share of the zoom-free attribute items that ask the colour of the
        picture's border instead (`BORDERS`): a band `border_width` px wide around the whole image, the
        cards of the scene kept inside it. The full view shows it all round; a crop of one tile shows at
        most a strip of it, and one of the two middle tiles none. The ground-truth box is the image.
    """

    height: int = 1008
    width: int = 1344
    max_pixels: int = 50176
    min_pixels: int = 3136
    factor: int = 28
    zoom_needed_frac: float = 0.5
    relative_frac: float = 0.4
    small_card: tuple[int, int] = (48, 72)
    large_card: tuple[float, float] = (0.2, 0.3)
    detail: float = 0.8
    distractors: tuple[int, int] = (2, 4)
    max_gap: int = 48
    layout: str = "free"
    tiles: tuple[int, int] = (4, 3)
    tile_fill: tuple[float, float] = (0.8, 0.9)
    frame_tiles: bool = False
    border_frac: float = 0.0
    border_width: int = 42

    def __post_init__(self):
        if self.border_frac and self.layout != "tiles":
            raise ValueError(f"border_frac={self.border_frac} needs layout='tiles', got {self.layout!r}")
        if not 0 <= self.border_frac <= 1:
            raise ValueError(f"border_frac={self.border_frac}: a share, between 0 and 1")
        if self.frame_tiles and (self.layout != "tiles" or tuple(self.tiles) != (4, 3)):
            raise ValueError(f"frame_tiles=True needs layout='tiles' with tiles=(4, 3), got "
                             f"layout={self.layout!r}, tiles={self.tiles}")
        if self.layout not in ("free", "tiles"):
            raise ValueError(f"layout={self.layout!r}; choose 'free' or 'tiles'")
        if self.layout == "tiles" and (self.width % self.tiles[0] or self.height % self.tiles[1]):
            raise ValueError(f"{self.width}x{self.height} does not split into {self.tiles} tiles; use a "
                             "size divisible by the tile counts")
        if self.layout == "tiles" and self.distractors[1] + 1 > self.tiles[0] * self.tiles[1]:
            raise ValueError(f"distractors={self.distractors}: more cards than the {self.tiles} tiles")
        if self.small_card[0] < ZOOM_MIN_SIDE or self.small_card[0] > self.small_card[1]:
            raise ValueError(f"small_card={self.small_card}: need {ZOOM_MIN_SIDE} <= low <= high")
        if not 0 < self.detail < 1:
            raise ValueError(f"detail={self.detail}: the stripe period must be below the downscale "
                             "factor (0 < detail < 1) or the stripes survive the full view")
        if self.downscale < 2:
            raise ValueError(f"{self.width}x{self.height} at max_pixels={self.max_pixels} is downscaled "
                             f"only {self.downscale:.2f}x; use a larger image or a smaller budget")

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(H, W) the model sees the full image at."""
        return smart_resize(self.height, self.width, self.factor, self.min_pixels, self.max_pixels)

    @property
    def downscale(self) -> float:
        """Original pixels per resized pixel (the larger of the two axes)."""
        rh, rw = self.resized_hw
        return max(self.height / rh, self.width / rw)

    @property
    def fine_stripe(self) -> int:
        """Stripe width (px) of zoom-needed cards: half the period `detail * downscale`."""
        return max(1, int(self.detail * self.downscale / 2))


    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """Tile `index` (row-major) as [x, y, w, h] in original pixels (layout="tiles")."""
        cols, rows = self.tiles
        tw, th = self.width // cols, self.height // rows
        return (index % cols) * tw, (index // cols) * th, tw, th


def tile_tint(index: int, tiles: tuple[int, int]) -> RGB:
    """The flat background of tile `index`: hue by column, brightness by row (all dark and muted).

    The tint is a location code the full view keeps: it stands in for the sense of absolute position
    a pretrained vision tower has (Qwen2.5-VL's tower has only relative, rotary positions, and a tiny
    random one would otherwise have to learn image coordinates from the borders alone).
    """
    cols, rows = tiles
    col, row = index % cols, index // cols
    hue = col / cols
    base = np.array([np.cos(2 * np.pi * (hue - k / 3)) for k in range(3)]) * 0.5 + 0.5  # [0, 1]
    level = 0.35 + 0.65 * (row + 1) / rows
    return tuple(int(v) for v in np.rint(20 + 70 * level * (0.4 + 0.6 * base)))


@dataclasses.dataclass(frozen=True)
class Card:
    """A framed striped card; `box` is [x, y, w, h] in pixels.

    The stripes are mid-grey plus or minus a contrast, so every pair averages to the same grey. With
    `taper` > 0 the contrast fades in over `taper` pixels at the two edges across the stripes: a hard
    edge would leave an unbalanced part-period there, a tint the downsampled view keeps.
    """

    box: tuple[int, int, int, int]
    frame: str
    stripes: str
    stripe_width: int
    vertical: bool
    taper: int = 0

    @property
    def interior(self) -> tuple[int, int, int, int]:
        """The striped area inside the frame, [x, y, w, h]."""
        x, y, w, h = self.box
        b = max(4, round(w * 0.15))
        return x + b, y + b, w - 2 * b, h - 2 * b

    def draw(self, img: np.ndarray) -> None:
        x, y, w, h = self.box
        img[y:y + h, x:x + w] = FRAMES[self.frame]
        ix, iy, iw, ih = self.interior
        n = iw if self.vertical else ih
        j = np.arange(n)
        sign = 1.0 - 2.0 * ((j // self.stripe_width) % 2)  # +1: first colour, -1: second
        weight = np.ones(n)
        if self.taper:
            ramp = np.minimum(1.0, np.minimum(j + 0.5, n - j - 0.5) / self.taper)
            weight = np.sin(np.pi / 2 * ramp) ** 2
        first, second = (np.array(c, np.float64) for c in PAIRS[self.stripes])
        mid = (first + second) / 2
        colors = np.rint(mid + (sign * weight)[:, None] * (first - mid)).astype(np.uint8)  # [n, 3]
        img[iy:iy + ih, ix:ix + iw] = colors[None, :, :] if self.vertical else colors[:, None, :]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dark, smooth, muted colour blobs (compresses well as PNG; never mistaken for a card)."""
    low = rng.integers(25, 95, (max(2, h // 96), max(2, w // 96), 3)).astype(np.uint8)
    return np.array(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))


def _place(rng: np.random.Generator, cfg: SyntheticConfig, w: int, h: int, taken: list[tuple[int, ...]],
           pad: int = 16) -> tuple[int, int, int, int]:
    """A free w x h box away from the boxes taken (rejection sampling)."""
    if w + 2 * pad >= cfg.width or h + 2 * pad >= cfg.height:
        raise ValueError(f"a {w}x{h} px region does not fit in {cfg.width}x{cfg.height}; use a larger "
                         "image or smaller cards")
    for _ in range(1000):
        x = int(rng.integers(pad, cfg.width - w - pad))
        y = int(rng.integers(pad, cfg.height - h - pad))
        if all(x + w + pad <= bx or bx + bw + pad <= x or y + h + pad <= by or by + bh + pad <= y
               for bx, by, bw, bh in taken):
            return x, y, w, h
    raise RuntimeError(f"no room for a {w}x{h} px card in {cfg.width}x{cfg.height}; use a larger image")


def _card(rng: np.random.Generator, cfg: SyntheticConfig, box: tuple[int, int, int, int], frame: str,
          stripes: str, small: bool) -> Card:
    """Small: fine tapered stripes (zoom needed); large: about four wide stripes (zoom free)."""
    if small:
        return Card(box, frame, stripes, cfg.fine_stripe, bool(rng.integers(2)), math.ceil(cfg.downscale))
    return Card(box, frame, stripes, max(2, round((box[2] * 0.7) / 4)), bool(rng.integers(2)))


def _side(rng: np.random.Generator, cfg: SyntheticConfig, small: bool) -> int:
    if small:
        return int(rng.integers(cfg.small_card[0], cfg.small_card[1] + 1))
    return int(rng.uniform(*cfg.large_card) * min(cfg.height, cfg.width))


def make_item(index: int, seed: int, cfg: SyntheticConfig) -> tuple[str, np.ndarray, dict[str, Any]]:
    """Item `index` of the set `seed`: (folder, uint8 [H, W, 3] image, V* annotation with extras).

    A pure function of (index, seed, cfg): item i is the same in a set of any size.
    """
    rng = np.random.default_rng([seed, index])
    zoom_needed = bool(rng.random() < cfg.zoom_needed_frac)
    relative = bool(rng.random() < cfg.relative_frac)
    if cfg.layout == "tiles":
        return _tiles_item(rng, cfg, zoom_needed and not relative, relative)
    img = _background(rng, cfg.height, cfg.width)
    pairs = list(PAIRS)
    if relative:
        p1, p2 = (pairs[i] for i in rng.permutation(len(pairs))[:2])
        side, horizontal = _side(rng, cfg, zoom_needed), bool(rng.integers(2))
        gap = int(rng.integers(8, cfg.max_gap + 1)) if zoom_needed else int(rng.integers(side // 4, side))
        span = 2 * side + gap
        x, y, _, _ = _place(rng, cfg, span if horizontal else side, side if horizontal else span, [])
        a, b = (x, y, side, side), ((x + side + gap, y) if horizontal else (x, y + side + gap)) + (side, side)
        if rng.integers(2):
            a, b = b, a  # the card named first is the later one half of the time
        cards = [_card(rng, cfg, a, "white", p1, zoom_needed), _card(rng, cfg, b, "white", p2, zoom_needed)]
        first_before = a[0] < b[0] if horizontal else a[1] < b[1]
        question, options, names = _relative_text(p1, p2, horizontal, first_before)
        targets, folder = [0, 1], "relative_position"
    else:
        frames = [list(FRAMES)[i] for i in rng.permutation(len(FRAMES))]
        cards, taken = [], []
        for k in range(1 + int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
            small = zoom_needed if k == 0 else bool(rng.random() < 0.7)  # distractors: mostly small
            side = _side(rng, cfg, small)
            taken.append(_place(rng, cfg, side, side, taken))
            cards.append(_card(rng, cfg, taken[-1], frames[k], pairs[int(rng.integers(len(pairs)))], small))
        question, options, names = _attribute_text(rng, frames[0], cards[0].stripes)
        targets, folder = [0], "direct_attributes"
    return folder, img, _annotate(img, cfg, cards, targets, names, question, options, zoom_needed)


def _relative_text(p1: str, p2: str, horizontal: bool, first_before: bool
                   ) -> tuple[str, list[str], list[str]]:
    """(question, options with the right one first, target names) of a relative-position item whose
    first-named card (stripes p1) is left of / above the other when `first_before`."""
    how = "on the left or right side of" if horizontal else "above or below"
    sides = ("on the left side of", "on the right side of") if horizontal else ("above", "below")
    options = [f"The card with {p1} stripes is {s} the card with {p2} stripes." for s in sides]
    question = f"Is the card with {p1} stripes {how} the card with {p2} stripes?"
    return question, options if first_before else options[::-1], [f"card with {p} stripes" for p in (p1, p2)]


def _attribute_text(rng: np.random.Generator, frame: str, answer: str) -> tuple[str, list[str], list[str]]:
    """(question, options with the right one first, target names) of a stripe-colour item."""
    pairs = list(PAIRS)
    options = [answer] + [pairs[i] for i in rng.permutation(len(pairs)) if pairs[i] != answer]
    question = f"Which two colors make up the stripes on the card with the {frame} frame?"
    return question, options, [f"card with the {frame} frame"]


def _border_text(rng: np.random.Generator, border: str) -> tuple[str, list[str], list[str]]:
    """(question, options with the right one first, target names) of a border-colour item."""
    names = list(BORDERS)
    options = [border] + [names[i] for i in rng.permutation(len(names)) if names[i] != border]
    return "What color is the border of the picture?", options, [BORDER_TARGET]


def _draw_border(img: np.ndarray, border: str, width: int) -> None:
    """Paints a band `width` px wide around `img` in the `BORDERS` colour `border`."""
    for region in (np.s_[:width], np.s_[-width:], np.s_[:, :width], np.s_[:, -width:]):
        img[region] = BORDERS[border]


def _annotate(img: np.ndarray, cfg: SyntheticConfig, cards: list[Card], targets: list[int], names: list[str],
              question: str, options: list[str], zoom_needed: bool, tiles: list[int] | None = None,
              border: str | None = None) -> dict[str, Any]:
    """Draws the cards (and the `border`, a colour of `BORDERS`) into `img` and returns the V*
    annotation with the `synthetic` extras. A border item's target is the whole image."""
    if border is not None:
        _draw_border(img, border, cfg.border_width)
    for card in cards:
        card.draw(img)
    drawn = [{**dataclasses.asdict(c), "interior": list(c.interior)} for c in cards]
    synthetic = {"cards": drawn, "targets": targets, "answer": options[0], "max_pixels": cfg.max_pixels,
                 "resized_hw": list(cfg.resized_hw)}
    if tiles is not None:
        for d, t in zip(drawn, tiles, strict=True):
            d["tile"] = t
        synthetic.update(layout="tiles", tiles=list(cfg.tiles))
    boxes = [list(cards[t].box) for t in targets]
    if border is not None:
        synthetic.update(border=border, border_width=cfg.border_width)
        boxes = [[0, 0, cfg.width, cfg.height]]
    return {"target_object": names, "bbox": boxes, "question": question,
            "options": options, "zoom_needed": zoom_needed, "synthetic": synthetic}


def _tile_card(rng: np.random.Generator, cfg: SyntheticConfig, tile: int, frame: str, stripes: str,
               small: bool, inset: int = 0) -> Card:
    """A card filling `tile_fill` of tile `tile`, jittered inside it; fine stripes when `small`. With
    `inset`, the card keeps `inset` px from the image's edges (inside a border), shrunk if need be."""
    tx, ty, tw, th = cfg.tile_box(tile)
    side = int(rng.uniform(*cfg.tile_fill) * min(tw, th))
    if inset:
        x2, y2 = min(tx + tw, cfg.width - inset), min(ty + th, cfg.height - inset)
        tx, ty = max(tx, inset), max(ty, inset)
        tw, th = x2 - tx, y2 - ty
        side = min(side, tw, th)
    x = tx + int(rng.integers(0, tw - side + 1))
    y = ty + int(rng.integers(0, th - side + 1))
    return _card(rng, cfg, (x, y, side, side), frame, stripes, small)


def _tiles_item(rng: np.random.Generator, cfg: SyntheticConfig, zoom_needed: bool,
                relative: bool) -> tuple[str, np.ndarray, dict[str, Any]]:
    """make_item for layout="tiles" (see SyntheticConfig)."""
    cols, rows = cfg.tiles
    img = np.zeros((cfg.height, cfg.width, 3), np.uint8)
    for t in range(cols * rows):
        x, y, w, h = cfg.tile_box(t)
        img[y:y + h, x:x + w] = tile_tint(t, cfg.tiles)
    pairs = list(PAIRS)
    border = None
    if relative:
        p1, p2 = (pairs[i] for i in rng.permutation(len(pairs))[:2])
        horizontal = bool(rng.integers(2))
        if horizontal:
            r = int(rng.integers(rows))
            c1, c2 = sorted(int(c) for c in rng.choice(cols, 2, replace=False))
            tiles = [r * cols + c1, r * cols + c2]
        else:
            c = int(rng.integers(cols))
            r1, r2 = sorted(int(r) for r in rng.choice(rows, 2, replace=False))
            tiles = [r1 * cols + c, r2 * cols + c]
        first = bool(rng.integers(2))  # whether the card named first is the left / upper one
        named = tiles if first else tiles[::-1]
        cards = [_tile_card(rng, cfg, named[0], "white", p1, False),
                 _tile_card(rng, cfg, named[1], "white", p2, False)]
        question, options, names = _relative_text(p1, p2, horizontal, first)
        targets, folder, card_tiles = [0, 1], "relative_position", named
    else:
        # no draw at border_frac 0: those sets keep their items
        border = (list(BORDERS)[int(rng.integers(len(BORDERS)))]
                  if cfg.border_frac and not zoom_needed and rng.random() < cfg.border_frac else None)
        frames = [list(FRAMES)[i] for i in rng.permutation(len(FRAMES))]
        k = 1 + int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
        card_tiles = [int(t) for t in rng.permutation(cols * rows)[:k]]  # drawn either way: the rest
        if cfg.frame_tiles:  # of the scene is the same with and without frame_tiles
            card_tiles = [FRAME_TILES[f] for f in frames[:k]]
        inset = cfg.border_width if border else 0
        cards = [_tile_card(rng, cfg, t, frames[i], pairs[int(rng.integers(len(pairs)))],
                            zoom_needed if i == 0 else bool(rng.random() < 0.7), inset)
                 for i, t in enumerate(card_tiles)]
        question, options, names = (_border_text(rng, border) if border
                                    else _attribute_text(rng, frames[0], cards[0].stripes))
        targets, folder = ([] if border else [0]), "direct_attributes"
    return folder, img, _annotate(img, cfg, cards, targets, names, question, options, zoom_needed, card_tiles,
                                  border)


def write_dataset(output: str | os.PathLike, num: int, seed: int = 0,
                  cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, Any]:
    """Writes `num` items under `output` in V* Bench's layout (see the module docstring).

    Returns:
      The metadata also written to `output/synthetic_vstar.json`: config, counts per folder and
      zoom-needed count.
    """
    output = os.fspath(output)
    counts = {"direct_attributes": 0, "relative_position": 0, "zoom_needed": 0}
    for i in range(num):
        folder, img, ann = make_item(i, seed, cfg)
        os.makedirs(os.path.join(output, folder), exist_ok=True)
        stem = os.path.join(output, folder, f"syn_{i:05d}")
        Image.fromarray(img).save(stem + ".png")  # PNG: JPEG's chroma subsampling would eat the stripes
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(ann, f)
        counts[folder] += 1
        counts["zoom_needed"] += ann["zoom_needed"]
    meta = {"num": num, "seed": seed, "config": dataclasses.asdict(cfg), "counts": counts,
            "resized_hw": list(cfg.resized_hw), "downscale": cfg.downscale, "fine_stripe": cfg.fine_stripe}
    with open(os.path.join(output, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_annotations(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every annotation under a V*-layout root by item id (`"{folder}/{stem}"`, as read_vstar names them)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(root), "*", "*.json"))):
        folder, name = os.path.split(path)
        with open(path, encoding="utf-8") as f:
            out[f"{os.path.basename(folder)}/{os.path.splitext(name)[0]}"] = json.load(f)
    return out


def zoom_flags(root: str | os.PathLike) -> dict[str, bool]:
    """Item id -> zoom_needed, for the items that record it ({} for real V* Bench)."""
    return {k: bool(a["zoom_needed"]) for k, a in read_annotations(root).items()
            if isinstance(a, dict) and "zoom_needed" in a}


# ------------------------------------------------------------------------------- oracle


def processor_view(image: np.ndarray, max_pixels: int, min_pixels: int = 3136,
                   factor: int = 28) -> np.ndarray:
    """The image as the vision tower receives it: smart_resize at the budget, PIL bicubic on uint8."""
    h, w = image.shape[:2]
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (rh, rw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC))


def classify_region(view: np.ndarray, box: tuple[float, float, float, float], scale: tuple[float, float],
                    rng: np.random.Generator) -> tuple[str, bool]:
    """The stripe pair of a card interior by nearest-colour votes in a (resized) view.

    Args:
      view: uint8 [h, w, 3]; box: the interior [x, y, w, h] in original pixels; scale: (sy, sx) from
        original to view pixels; rng: draws the guess when no pixel votes for a pair.

    Returns:
      (pair name, decided): decided is False when the answer was a guess.
    """
    sy, sx = scale
    x, y, w, h = box
    # View pixels wholly inside the region (at least the one at its centre).
    x1, x2 = math.ceil(x * sx), math.floor((x + w) * sx) - 1
    y1, y2 = math.ceil(y * sy), math.floor((y + h) * sy) - 1
    if x2 < x1 or y2 < y1:
        x1 = x2 = int((x + w / 2) * sx)
        y1 = y2 = int((y + h / 2) * sy)
    pixels = view[y1:y2 + 1, x1:x2 + 1].reshape(-1, 3).astype(np.float32)
    palette = [c for pair in PAIRS.values() for c in pair] + list(NEUTRALS)
    nearest = np.argmin(((pixels[:, None] - np.array(palette, np.float32)[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest[nearest < 2 * len(PAIRS)] // 2, minlength=len(PAIRS))
    names = list(PAIRS)
    if votes.max() == 0:
        return names[int(rng.integers(len(names)))], False
    best = np.flatnonzero(votes == votes.max())
    return names[int(rng.choice(best))], len(best) == 1


def _answer(options: list[str], predicted: list[str], truth: list[str], rng: np.random.Generator) -> str:
    """The option the pairs read from the target cards imply; a guess when they do not decide."""
    if len(truth) == 1:
        return predicted[0]  # attribute options are the pairs themselves
    hits = [p == truth[0] for p in predicted]  # which card reads as the pair named first
    if hits.count(True) != 1:
        return options[int(rng.integers(len(options)))]
    return options[0] if hits[0] else options[1]


def _variants(image: np.ndarray, targets: list[dict[str, Any]]) -> list[np.ndarray]:
    """The image redrawn with every other answer: the target's other pairs, or the two pairs swapped."""
    pairs = [c["stripes"] for c in targets]
    swaps = [[p] for p in PAIRS if p != pairs[0]] if len(targets) == 1 else [pairs[::-1]]
    out = []
    for swap in swaps:
        img = image.copy()
        for c, pair in zip(targets, swap, strict=True):
            Card(tuple(c["box"]), c["frame"], pair, c["stripe_width"], c["vertical"], c["taper"]).draw(img)
        out.append(img)
    return out


def _views(image: np.ndarray, crop: tuple[int, int, int, int], budget: int, min_pixels: int,
           factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(full view, view of the crop [x1, y1, x2, y2]), both as the processor makes them."""
    x1, y1, x2, y2 = crop
    return (processor_view(image, budget, min_pixels, factor),
            processor_view(np.ascontiguousarray(image[y1:y2, x1:x2]), budget, min_pixels, factor))


def read_border(view: np.ndarray) -> str:
    """The border colour of a (resized) view: the `BORDERS` colour nearest the mean of its outermost
    ring of pixels."""
    ring = np.concatenate([view[0], view[-1], view[1:-1, 0], view[1:-1, -1]]).astype(np.float32)
    names = list(BORDERS)
    dist = ((ring.mean(0)[None] - np.array([BORDERS[n] for n in names], np.float32)) ** 2).sum(-1)
    return names[int(np.argmin(dist))]


def _border_row(image: np.ndarray, ann: dict[str, Any], budget: int, min_pixels: int, factor: int
                ) -> dict[str, float]:
    """oracle_check's row for a border item: read from the full view, and from a crop of one of the
    two middle tiles of the 4 x 3 lattice (which holds no border) as the crop; the swaps redraw the
    band in the other colours."""
    syn = ann["synthetic"]
    h, w = image.shape[:2]
    cols, rows = syn["tiles"]
    tw, th = w // cols, h // rows
    middle = (tw, th, 2 * tw, 2 * th)  # tile 5: no edge of the image
    full, zoomed = _views(image, middle, budget, min_pixels, factor)
    swaps = []
    for other in BORDERS:
        if other != syn["border"]:
            img = image.copy()
            _draw_border(img, other, syn["border_width"])
            swaps.append(_views(img, middle, budget, min_pixels, factor))
    row = {"full_view": read_border(full) == syn["border"], "full_view_decided": True,
           "crop": read_border(zoomed) == syn["border"],
           "full_view_swap": max(np.abs(f.astype(int) - full).max() for f, _ in swaps),
           "crop_swap": max(np.abs(c.astype(int) - zoomed).max() for _, c in swaps)}
    return {k: float(v) for k, v in row.items()}


def oracle_check(root: str | os.PathLike, max_pixels: int | None = None, min_pixels: int = 3136,
                 factor: int = 28, margin: float = 0.25, limit: int | None = None,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """What a nearest-colour observer gets from the full view and from the ground-truth crop.

    Both views are processed as the model's processor would at `max_pixels` (default: the budget the set
    was made for). The crop is the union of the target boxes grown by `margin` of its size each side.

    Returns:
      {"zoom_needed/<folder>" | "zoom_free/<folder>": {"n", "chance", "full_view", "crop" (accuracies),
       "full_view_decided" (fraction answered without a guess), "full_view_swap", "crop_swap" (mean over
       items of the largest change, in grey levels, that any other answer drawn in makes to the view)}}.
      Border items (`border_frac`) are read from the ring of the view's outermost pixels; their "crop" is
      one of the two middle tiles (no border in it: what a zoom into one card's tile can lose).
    """
    rng = np.random.default_rng(seed)
    anns = read_annotations(root)
    tally: dict[str, list[dict[str, float]]] = {}
    for key in sorted(anns)[:limit]:
        ann = anns[key]
        budget = max_pixels or ann["synthetic"]["max_pixels"]
        with Image.open(os.path.join(os.fspath(root), key + ".png")) as im:
            image = np.asarray(im.convert("RGB"))
        group = f"{'zoom_needed' if ann['zoom_needed'] else 'zoom_free'}/{key.split('/')[0]}"
        if "border" in ann["synthetic"]:
            tally.setdefault(group, []).append(_border_row(image, ann, budget, min_pixels, factor))
            continue
        targets = [ann["synthetic"]["cards"][t] for t in ann["synthetic"]["targets"]]
        b = np.array([c["box"] for c in targets], np.float64)
        lo, hi = b[:, :2].min(0), (b[:, :2] + b[:, 2:]).max(0)
        lo, hi = np.maximum(lo - margin * (hi - lo), 0), np.minimum(hi + margin * (hi - lo),
                                                                    image.shape[1::-1])
        crop = (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
        full, zoomed = _views(image, crop, budget, min_pixels, factor)
        scale = (full.shape[0] / image.shape[0], full.shape[1] / image.shape[1])
        cscale = (zoomed.shape[0] / (crop[3] - crop[1]), zoomed.shape[1] / (crop[2] - crop[0]))
        full_pred = [classify_region(full, c["interior"], scale, rng) for c in targets]
        crop_pred = [classify_region(zoomed, (c["interior"][0] - crop[0], c["interior"][1] - crop[1],
                                              *c["interior"][2:]), cscale, rng) for c in targets]
        swaps = [_views(v, crop, budget, min_pixels, factor) for v in _variants(image, targets)]
        truth, options = [c["stripes"] for c in targets], ann["options"]
        row = {"full_view": _answer(options, [p for p, _ in full_pred], truth, rng) == options[0],
               "full_view_decided": all(d for _, d in full_pred),
               "crop": _answer(options, [p for p, _ in crop_pred], truth, rng) == options[0],
               "full_view_swap": max(np.abs(f.astype(int) - full).max() for f, _ in swaps),
               "crop_swap": max(np.abs(c.astype(int) - zoomed).max() for _, c in swaps)}
        tally.setdefault(group, []).append({k: float(v) for k, v in row.items()})
    return {g: {"n": len(rows), "chance": 1 / (4 if g.endswith("attributes") else 2),
                **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
            for g, rows in sorted(tally.items())}
