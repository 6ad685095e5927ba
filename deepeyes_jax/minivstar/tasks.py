"""Mini-V* items: the synthetic V*-style scenes as training records, and the format stage's turns.

The scenes come from `data.synthetic_vstar` with the "tiles" layout (`SYNTHETIC`): a 4 x 3 lattice of
252 px tiles on a 1008 x 756 image, seen by the model at 252 x 168 (max_pixels 50,176, 4-4.5x down).
Zoom-needed cards have stripes 2 px wide (period below the downscale: a grey card in the full view,
resolved in a crop of its tile); zoom-free cards have stripes tens of pixels wide.

Records follow `data/schema.py`. Zoom-needed items are `data_source="vstar"` (the V* reward with its
tool term); zoom-free items are `"minivstar_free"` (border items `"minivstar_border"`), the same answer
rules without a tool term, as the non-V* share of DeepEyes' mixture (ThinkLite) has none. Options are
shuffled per item.

The format stage's turns (`format_turns`) are what a pretrained VLM brings: the protocol, boxes that
enclose objects, and reading what it sees; but not where or when to look. Each item is zoomed with
probability `zoom_prob` whatever it needs, into the tile of a random card of the scene (a coarse box
around some object), or with probability `aim` (attribute items; 0.5 in the Mini-V* default) into the
asked card's: a weak prior, as a pretrained VLM zooms better than chance but not reliably. The Mini-V*
default's zoom turn names nothing ("Zoom in on a card."): the box is where the model looks, and
grounding captions (below) are the only place a frame word decides a box.
Two options add reasoning that points at the card: with `name`, the zoom turn names the card it zooms
into by its frame ("Zoom in on the crimson card."), so the box follows the name, named at random; with
`restate`, the first turn opens by saying what the question asks about, in the words of the item's
`target_object` annotation ("The question asks about the card with the gold frame."), as a pretrained
model reads a question. Neither ties the card zoomed into to the question (BENCHMARKS.md, Mini-V*
sixth and seventh runs measure both). The answer reports the last image the model looked at: after a
zoom, the stripes of the card it zoomed into (relative items: an arbitrary option, one card cannot
settle them; border items likewise: a crop of one tile shows a strip of the border at most); without
one, the right option when the full view shows it (zoom-free items), else an
arbitrary option. So the starting model zooms mostly at random, reads whatever card it zoomed into,
and is right only when that card is the one asked about. GRPO has to learn to zoom into the card the
question asks about, and when zooming pays. Answers are the option's text, as DeepEyes' curated
training answers are open-ended (the rule judge accepts a letter or the option text), except on
relative items, which answer with the option's letter (`written`).

Before the protocol, `pretrain_example` gives the perception a pretrained VLM has, as short
single-turn captions without the tool protocol: the stripes of a card seen in a crop of its tile, the
box (tile) of the card with a given frame (grounding: the bare `bbox_2d` JSON Qwen2.5-VL is trained to
write), the answer to a zoom-free question from the full view, and (kind "read", off by default) what
a question asks about (the restated target, as a language model reads a question). Nothing there
says to zoom, when, or into which card.
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
                               detail=0.9, zoom_needed_frac=0.75, relative_frac=0.2, distractors=(1, 2),
                               frame_tiles=True)
FREE_SOURCE = "minivstar_free"
BORDER_SOURCE = "minivstar_border"  # zoom-free border items (`SyntheticConfig.border_frac`): same rules
# The V2 prompt's gist in two lines (the byte-exact V2 system prompt is 297 tokens of JSON schema
# a model trained from scratch cannot read; it would be half of every CPU sequence). The user suffix
# stays the reference's.
SYSTEM_PROMPT = ("You are a helpful assistant.\n\n# Tools\n"
                 "image_zoom_in_tool(bbox_2d=[x1, y1, x2, y2], label): "
                 "zoom in on a region of the image. Call it inside <tool_call></tool_call>.")
THINK_ANSWER = "I can answer."
THINK_LOOK = "Zoom in on a card."  # a zoom turn's reasoning without `name`


def think_zoom(frame: str) -> str:
    """The reasoning of a zoom turn: it names the card it zooms into (by its frame colour). Worded
    unlike `think_restate` ("... the card with the gold frame."), so the two slots a frame word fills
    follow different words: with the same wording a 2-layer model fills both alike and never learns to
    read the question into the first (BENCHMARKS.md, Mini-V* seventh runs)."""
    return f"Zoom in on the {frame} card."


def think_restate(task: Task) -> str:
    """The first sentence of a first turn with `restate`: what the question asks about, in the words
    of its V*-style `target_object` annotation ("card with the gold frame")."""
    return restate(task.annotation["target_object"])


def restate(objects: list[str]) -> str:
    """"The question asks about the card with the gold frame." for objects ["card with the gold frame"]."""
    return "The question asks about the " + " and the ".join(objects) + "."


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
            id=rid, data_source=_source(ann), image=_png(img),
            question=choices.format_question(ann["question"], options), answer=answer, options=options,
            gt_boxes=boxes, category=("zoom_needed/" if ann["zoom_needed"] else "zoom_free/") + folder)
        out.append(Task(rec, ann))
    return tuple(out)


def _source(ann: dict[str, Any]) -> str:
    if ann["zoom_needed"]:
        return "vstar"
    return BORDER_SOURCE if "border" in ann["synthetic"] else FREE_SOURCE


def tile_box(tile: int, cfg: sv.SyntheticConfig = SYNTHETIC) -> list[int]:
    """Tile `tile` as [x1, y1, x2, y2] in the model's (resized) frame, the frame its boxes are read in."""
    rh, rw = cfg.resized_hw
    x, y, w, h = cfg.tile_box(tile)
    sx, sy = rw / cfg.width, rh / cfg.height
    return [round(x * sx), round(y * sy), round((x + w) * sx), round((y + h) * sy)]


def zoom_turn(box: list[int], think: str) -> str:
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box, "label": "card"}}
    return f"<think>{think}</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_turn(answer: str, think: str = THINK_ANSWER) -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer><|im_end|>"


def right_option(task: Task) -> str:
    """The text of the task's right option."""
    rec = task.record
    return rec["options"][choices.LETTERS.index(rec["answer"])]


def is_relative(task: Task) -> bool:
    return len(task.annotation["synthetic"]["targets"]) > 1


def item_kind(task: Task) -> str:
    """"attribute" (one card asked about), "relative" (two cards) or "border" (the picture's border)."""
    if "border" in task.annotation["synthetic"]:
        return "border"
    return "relative" if is_relative(task) else "attribute"


def asks_card(task: Task) -> bool:
    """Whether the task asks about one card (an attribute item): it has one target card."""
    return item_kind(task) == "attribute"


def written(task: Task, option: str) -> str:
    """How the format stage answers with `option`: its text, or for a relative-position item its
    letter. Relative options are two 20-token sentences that differ in one word; the tiny model cannot
    copy them, so text answers scored 0 of 20 held-out relative items before and after GRPO and gave
    GRPO no signal on them (BENCHMARKS.md, Mini-V* eighth runs). The rule judge accepts either form."""
    if not is_relative(task):
        return option
    return choices.LETTERS[task.record["options"].index(option)]


def format_turns(task: Task, rng: np.random.Generator, zoom_prob: float = 0.5,
                 cfg: sv.SyntheticConfig = SYNTHETIC, restate: bool = False, name: bool = True,
                 aim: float = 0.0) -> list[str]:
    """The teacher-forced assistant turns of one format-stage episode (see the module docstring);
    `cfg` is the generator configuration the task was made with. With `restate`, the first turn's
    reasoning opens by saying what the question asks about (`think_restate`); the card it then zooms
    into is still random. Without `name`, the zoom's reasoning does not name that card (`THINK_LOOK`).
    A share `aim` of the zooms of attribute items go into the asked card instead of a random one."""
    rec, syn = task.record, task.annotation["synthetic"]
    right = written(task, right_option(task))
    arbitrary = written(task, rec["options"][int(rng.integers(len(rec["options"])))])
    lead = think_restate(task) + " " if restate else ""
    if rng.random() >= zoom_prob:
        return [answer_turn(right if not task.zoom_needed else arbitrary, lead + THINK_ANSWER)]
    card = syn["cards"][int(rng.integers(len(syn["cards"])))]
    one_card = asks_card(task)
    if aim and one_card and rng.random() < aim:  # no draw at 0: the default's episodes stay
        card = syn["cards"][syn["targets"][0]]
    think = think_zoom(card["frame"]) if name else THINK_LOOK
    return [zoom_turn(tile_box(card["tile"], cfg), lead + think),
            answer_turn(card["stripes"] if one_card else arbitrary)]


def ground_question(frame: str) -> str:
    return f"Where is the card with the {frame} frame?"


def ground_call(task: Task, rng: np.random.Generator, cfg: sv.SyntheticConfig = SYNTHETIC
                ) -> tuple[str, list[str]]:
    """(question, turns) of a grounding call: asked where a random card of the scene is, the model
    zooms into its tile and reports its stripes. Grounding in the tool protocol, as a pretrained VLM
    grounds a named object in whatever format it is asked for; nothing says which card a question
    about stripes needs."""
    cards = task.annotation["synthetic"]["cards"]
    card = cards[int(rng.integers(len(cards)))]
    return ground_question(card["frame"]), [zoom_turn(tile_box(card["tile"], cfg), THINK_LOOK),
                                             answer_turn(card["stripes"])]


CROP_QUESTION = "Which two colors make up the stripes on the card?"
PRETRAIN_KINDS = ("crop", "ground", "full_view", "read")


def grounding_text(box: list[int]) -> str:
    """A grounding answer as Qwen2.5-VL writes one (bare JSON, then the end of the turn)."""
    return json.dumps({"bbox_2d": box, "label": "card"}) + "<|im_end|>"


def pretrain_example(task: Task, kind: str, rng: np.random.Generator,
                     cfg: sv.SyntheticConfig = SYNTHETIC) -> tuple[Image.Image, str, str]:
    """(image, question, forced answer turn) of one pretraining caption of `task` (module docstring):

      crop:      a random card's tile, cropped from the original -> its stripes;
      ground:    the full image, "Where is the card with the F frame?" -> its tile box (resized frame);
      full_view: the full image and the item's question -> the right option (zoom-free items only;
                 relative items answer with its letter, `written`);
      read:      the full image and the item's question (half the time without its options) -> what
                 it asks about (`think_restate`; attribute items only).
    """
    syn = task.annotation["synthetic"]
    card = syn["cards"][int(rng.integers(len(syn["cards"])))]
    if kind == "crop":
        x, y, w, h = cfg.tile_box(card["tile"])
        return image_of(task).crop((x, y, x + w, y + h)), CROP_QUESTION, answer_turn(card["stripes"])
    if kind == "ground":
        return (image_of(task), ground_question(card["frame"]),
                grounding_text(tile_box(card["tile"], cfg)))
    if kind == "read":
        if not asks_card(task):
            raise ValueError(f"read captions need an attribute item (one card asked about), not a "
                             f"{item_kind(task)} item")
        # half of them the bare question, without options: the frame word a few tokens from the answer
        question = task.record["question"] if rng.random() < 0.5 else task.annotation["question"]
        return image_of(task), question, think_restate(task) + "<|im_end|>"
    if kind == "full_view":
        if task.zoom_needed:
            raise ValueError("full_view captions need a zoom-free item: the full view hides this answer")
        return image_of(task), task.record["question"], answer_turn(written(task, right_option(task)))
    raise ValueError(f"kind={kind!r}; choose one of {PRETRAIN_KINDS}")


def image_of(task: Task) -> Image.Image:
    """The task's image (decoded from its record's PNG bytes)."""
    return Image.open(io.BytesIO(task.record["image"])).convert("RGB")
