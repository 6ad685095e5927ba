"""Mini-V* items: the synthetic V*-style scenes as training records, and the format stage's turns.

The scenes come from `data.synthetic_vstar` with the "tiles" layout (`SYNTHETIC`): a 4 x 3 lattice of
252 px tiles on a 1008 x 756 image, seen by the model at 252 x 168 (max_pixels 50,176, 4-4.5x down).
Zoom-needed cards have stripes 2 px wide (period below the downscale: a grey card in the full view,
resolved in a crop of its tile); zoom-free cards have stripes tens of pixels wide.

Records follow `data/schema.py`. Zoom-needed items are `data_source="vstar"` (the V* reward with its
tool term); zoom-free items are `"minivstar_free"`, the same answer rules without a tool term, as the
non-V* share of DeepEyes' mixture (ThinkLite) has none. Options are shuffled per item.

The format stage's turns (`format_turns`) are what a pretrained VLM brings: the protocol, boxes that
enclose objects, and reading what it sees; but not where or when to look. Each item is zoomed with
probability `zoom_prob` whatever it needs, into the tile of a random card of the scene (a coarse box
around some object). The answer is the right option when the last image the model looked at shows the
deciding detail (the full view of a zoom-free item; a crop of the target card), else an arbitrary
option. So the starting model zooms at random and answers from the latest view. Answers are the
option's text, as DeepEyes' curated training answers are open-ended (the rule judge accepts a letter
or the option text).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from deepeyes_jax.data import choices, schema
from deepeyes_jax.data import synthetic_vstar as sv

SYNTHETIC = sv.SyntheticConfig(height=756, width=1008, max_pixels=50176, layout="tiles", tiles=(4, 3),
                               detail=0.9, zoom_needed_frac=0.75, relative_frac=0.2, distractors=(1, 2))
FREE_SOURCE = "minivstar_free"
# The V2 prompt's gist in two lines (the byte-exact V2 system prompt is 297 tokens of JSON schema
# a model trained from scratch cannot read; it would be half of every CPU sequence). The user suffix
# stays the reference's.
SYSTEM_PROMPT = ("You are a helpful assistant.\n\n# Tools\n"
                 "image_zoom_in_tool(bbox_2d=[x1, y1, x2, y2], label): "
                 "zoom in on a region of the image. Call it inside <tool_call></tool_call>.")
THINK_ZOOM = "Zoom in on the card."
THINK_ANSWER = "I can answer."


@dataclasses.dataclass(frozen=True)
class Task:
    """One item: its training record and its generator annotation."""

    record: dict[str, Any]
    annotation: dict[str, Any]

    @property
    def zoom_needed(self) -> bool:
        return bool(self.annotation["zoom_needed"])


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # lossless: JPEG would eat the stripes
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def make_tasks(n: int, seed: int, cfg: sv.SyntheticConfig = SYNTHETIC, start: int = 0) -> tuple[Task, ...]:
    """Items start..start+n of the set `seed` as records (options shuffled with `seed`).

    Cached: a Mini-V* run asks for the same training set twice (format stage, GRPO data), and drawing
    and PNG-encoding a thousand scenes takes tens of seconds. Treat the result as read-only.
    """
    out = []
    for i in range(start, start + n):
        folder, img, ann = sv.make_item(i, seed, cfg)
        rid = f"minivstar/{seed}/{folder}/{i:05d}"
        options, answer = choices.shuffle_options([str(o) for o in ann["options"]], "A", seed, rid)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in ann["bbox"]]
        rec = schema.make_record(
            id=rid, data_source="vstar" if ann["zoom_needed"] else FREE_SOURCE, image=_png(img),
            question=choices.format_question(ann["question"], options), answer=answer, options=options,
            gt_boxes=boxes, category=("zoom_needed/" if ann["zoom_needed"] else "zoom_free/") + folder)
        out.append(Task(rec, ann))
    return tuple(out)


def tile_box(tile: int, cfg: sv.SyntheticConfig = SYNTHETIC) -> list[int]:
    """Tile `tile` as [x1, y1, x2, y2] in the model's (resized) frame, the frame its boxes are read in."""
    rh, rw = cfg.resized_hw
    x, y, w, h = cfg.tile_box(tile)
    sx, sy = rw / cfg.width, rh / cfg.height
    return [round(x * sx), round(y * sy), round((x + w) * sx), round((y + h) * sy)]


def zoom_turn(box: list[int], think: str = THINK_ZOOM) -> str:
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box, "label": "card"}}
    return f"<think>{think}</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_turn(answer: str, think: str = THINK_ANSWER) -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer><|im_end|>"


def format_turns(task: Task, rng: np.random.Generator, zoom_prob: float = 0.5,
                 cfg: sv.SyntheticConfig = SYNTHETIC) -> list[str]:
    """The teacher-forced assistant turns of one format-stage episode (see the module docstring);
    `cfg` is the generator configuration the task was made with."""
    rec, syn = task.record, task.annotation["synthetic"]
    right = rec["options"][choices.LETTERS.index(rec["answer"])]
    arbitrary = rec["options"][int(rng.integers(len(rec["options"])))]
    if rng.random() >= zoom_prob:
        return [answer_turn(right if not task.zoom_needed else arbitrary)]
    cards = [c["tile"] for c in syn["cards"]]
    tile = cards[int(rng.integers(len(cards)))]
    target = [cards[t] for t in syn["targets"]]
    sees = len(target) == 1 and tile == target[0]  # one crop shows one card: relative items need two
    return [zoom_turn(tile_box(tile, cfg)), answer_turn(right if sees else arbitrary)]


def image_of(task: Task) -> Image.Image:
    """The task's image (decoded from its record's PNG bytes)."""
    return Image.open(io.BytesIO(task.record["image"])).convert("RGB")
