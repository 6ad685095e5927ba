"""The format stage: supervised training on teacher-forced episodes, the stand-in for pretraining.

Two phases share one optimizer. Pretraining captions (`tasks.pretrain_example`: crops -> stripes,
grounding boxes, zoom-free questions from the full view, what a question asks about) are short
single-turn sequences without the tool protocol, so perception is learnt at a quarter of an episode's
cost. Then the protocol: each step draws a batch of tasks, writes their turns (`tasks.format_turns`)
and lays each episode out on the host with `sampling.forced.forced_trajectory`: the tool call is parsed
and executed, the crop processed and the observation placed in the context exactly as the sampler does
in RL (token for token, see the tests), without a model call. The forced tokens then get the loss.

The loss is the GRPO update itself with advantage 1 on every forced token and the old log-probs equal
to the current ones: `weighted_nll` ignores the ratio, and the gradient is that of the token-mean negative
log-likelihood. One jitted step serves both stages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image

from deepeyes_jax.data import choices
from deepeyes_jax.minivstar import tasks as tasks_lib
from deepeyes_jax.model import sharding
from deepeyes_jax.model.checkpoint import Pretrained
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import Prompt, RolloutConfig, Sample, Sampler, Trajectory, engine, forced
from deepeyes_jax.tools import observation, registry
from deepeyes_jax.utils import buckets


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    """`pretrain_steps` x `pretrain_batch` captions, then `steps` x `batch` protocol episodes, at
    learning rate `lr`; `zoom_prob` of the episodes zoom (see tasks.py). Each caption step trains on
    one kind (tasks.PRETRAIN_KINDS): the first `crop_first` caption steps on crops, the next
    `ground_first` on grounding, the rest drawn with the weights `kinds`. A share `refresh` of the
    protocol-phase steps are caption steps again (kinds drawn with `kinds`). With `crop_as_observation`,
    crop captions show the crop as the zoom tool's observation and answer with the protocol's answer
    turn (`observation_prompt`). With `restate`, protocol episodes open their reasoning with what the
    question asks about (`tasks.think_restate`). With `name_zoom` (default), the zoom's reasoning names
    the card it zooms into (`tasks.format_turns`'s `name`). A share `aim` of attribute zooms go into the
    asked card (`tasks.format_turns`), a share `ground_calls` of protocol episodes are grounding calls
    (`tasks.ground_call`). Batches are padded as `rl/batch.pack`'s `length_multiple` and
    `window_multiple` say (0: powers of two).

    Crops first: reading a crop is the first dependency the model forms ("red and" -> "cyan" comes with
    it), and once formed, grounding (the box from the frame named in the question) learns several times
    faster. Mixed from the start, the crop captions stay at the NLL of two independent colours (0.17 per
    token) for 60+ crop steps; alone, they drop below 0.05 within 60 (BENCHMARKS.md, Mini-V* fourth runs).

    Refresh and crops as observations: a model that stops seeing crop captions after its first phase
    forgets them, and the protocol never reads its crop observations (first colour at chance after 80
    protocol steps); a 2-layer model's reading is tied to the layout it was learnt in. Keeping crop
    captions among the protocol steps, and showing them in the observation's layout, gives a model that
    reads the observation (BENCHMARKS.md, Mini-V* fifth runs).

    Grounding next: mixed with the other kinds, the box never came to depend on the frame it names,
    in grounding captions or in the protocol (first box digit equally likely with the named card's
    box and another card's); 40 grounding-only steps make it depend on it, and the protocol's boxes
    then follow the card its reasoning names (BENCHMARKS.md, Mini-V* sixth runs).

    Reading: with `restate`, the protocol's reasoning restates what the question asks about (one frame
    word), and read captions (`kinds`) train the same. The tiny model learns to copy that word slowly
    and partly (greedy restate of the asked card on 13-39 of 76 held-out attribute items), and GRPO then
    names one card for every question; read-only caption steps broke the protocol. The Mini-V* default
    uses neither, nor `name_zoom` nor `ground_calls`; it uses `aim` (BENCHMARKS.md, Mini-V* seventh
    runs).
    """

    steps: int = 60
    batch: int = 16
    pretrain_steps: int = 150
    pretrain_batch: int = 32
    kinds: tuple[float, float, float, float] = (0.6, 0.2, 0.2, 0.0)
    crop_first: int = 0
    ground_first: int = 0
    refresh: float = 0.0
    restate: bool = False
    name_zoom: bool = True
    ground_calls: float = 0.0
    aim: float = 0.0
    crop_as_observation: bool = False
    lr: float = 1e-3
    zoom_prob: float = 0.5
    seed: int = 0
    micro_batches: int = 1
    length_multiple: int = 0
    window_multiple: int = 0

    def __post_init__(self):
        if not 0 <= self.crop_first <= self.pretrain_steps:
            raise ValueError(f"crop_first={self.crop_first} must lie in [0, pretrain_steps="
                             f"{self.pretrain_steps}]: it counts caption steps")
        if not 0 <= self.ground_first <= self.pretrain_steps - self.crop_first:
            raise ValueError(f"ground_first={self.ground_first} must lie in [0, pretrain_steps - crop_first="
                             f"{self.pretrain_steps - self.crop_first}]: it counts the caption steps after "
                             "the crop-only ones")
        if not 0 <= self.refresh < 1:
            raise ValueError(f"refresh={self.refresh} must lie in [0, 1): the share of protocol-phase steps "
                             "that train on captions")
        if len(self.kinds) != len(tasks_lib.PRETRAIN_KINDS) or min(self.kinds) < 0 or not sum(self.kinds):
            raise ValueError(f"kinds={self.kinds}: give {len(tasks_lib.PRETRAIN_KINDS)} non-negative weights "
                             f"for {tasks_lib.PRETRAIN_KINDS}, not all zero")
        for name in ("length_multiple", "window_multiple"):
            buckets.check_multiple(getattr(self, name), name)


KINDS = (*tasks_lib.PRETRAIN_KINDS, "protocol")  # what a format step trains on


def forced_only(traj: Trajectory) -> Trajectory:
    """The trajectory with its loss mask on the teacher-forced tokens (the sampler's action mask marks
    only sampled ones)."""
    return dataclasses.replace(traj, action_mask=(traj.source == engine.FORCED).astype(np.int32))


def episodes(sampler: Sampler, tasks: Sequence[tasks_lib.Task], rng: np.random.Generator, n: int,
             zoom_prob: float, restate: bool = False, name: bool = True, ground_calls: float = 0.0,
             aim: float = 0.0) -> list[Trajectory]:
    """`n` teacher-forced format-stage episodes of random tasks, loss mask on the forced tokens. A share
    `ground_calls` of them are grounding calls (`tasks.ground_call`) instead of the task's question."""
    picked = [tasks[int(i)] for i in rng.integers(len(tasks), size=n)]
    out = []
    for t in picked:
        if ground_calls and rng.random() < ground_calls:  # no draw at 0: the default's episodes stay
            question, turns = tasks_lib.ground_call(t, rng)
        else:
            question = t.record["question"]
            turns = tasks_lib.format_turns(t, rng, zoom_prob, restate=restate, name=name, aim=aim)
        out.append(forced_only(forced.forced_trajectory(
            sampler, Prompt(image=tasks_lib.image_of(t), question=question), turns)))
    return out


def caption_pools(tasks: Sequence[tasks_lib.Task]) -> dict[str, Sequence[int]]:
    """Per caption kind, the tasks it can draw from: grounding from attribute scenes (their frames
    tell cards apart), full-view questions from zoom-free items, crops from any scene."""
    framed = [i for i, t in enumerate(tasks) if not tasks_lib.is_relative(t)]
    return {"crop": range(len(tasks)), "ground": framed,
            "full_view": [i for i, t in enumerate(tasks) if not t.zoom_needed],
            "read": [i for i, t in enumerate(tasks) if tasks_lib.asks_card(t)]}


def observation_prompt(sampler: Sampler, image: Image.Image) -> list[int]:
    """Prompt ids that show `image` as the zoom tool's observation shows a crop: the user turn
    `<tool_response>` + image + the reference's user suffix + `</tool_response>`, then the assistant's
    turn opens. The same ids `tools.observation` appends after a tool call (without the `<|im_end|>`
    that closes the calling turn)."""
    result = registry.ToolResult(name="image_zoom_in_tool", call_text="", status="ok", image=image)
    tokens = sampler.processor.num_tokens(image.height, image.width)  # from the size: no pixels processed
    ids, _ = observation.observation_ids(result, sampler.tokenizer, tokens, close_turn=False)
    return ids


def captions(sampler: Sampler, tasks: Sequence[tasks_lib.Task], rng: np.random.Generator, n: int,
             kind: str, pools: dict[str, Sequence[int]] | None = None, crop_as_observation: bool = False
             ) -> list[Trajectory]:
    """`n` pretraining captions of one `kind` (`sampler` renders without tools: no system prompt, no
    suffix) from `pools` (default `caption_pools(tasks)`). One kind per batch keeps the batch's
    lengths alike: crops and grounding fit 128 tokens, full-view questions with options and crops shown
    as observations 256.

    With `crop_as_observation`, a crop caption shows the crop as a tool observation
    (`observation_prompt`) and its answer turn is the protocol's (`tasks.answer_turn`), instead of
    asking `tasks.CROP_QUESTION` about it: the layout in which the protocol reads crops.
    """
    pools = caption_pools(tasks) if pools is None else pools
    pool = pools[kind]
    if not len(pool):
        raise ValueError(f"no training item supports {kind} captions; add items or drop the kind")
    out = []
    for i in rng.integers(len(pool), size=n):
        image, question, answer = tasks_lib.pretrain_example(tasks[pool[int(i)]], kind, rng)
        prompt = (Prompt(image=image, prompt_ids=observation_prompt(sampler, image))
                  if kind == "crop" and crop_as_observation else Prompt(image=image, question=question))
        out.append(forced_only(forced.forced_trajectory(sampler, prompt, [answer])))
    return out


def probe(sampler: Sampler, tasks: Sequence[tasks_lib.Task], prompts: int, samples: int, temperature: float,
          seed: int = 0) -> dict[str, float]:
    """How the model behaves when *sampled* as GRPO will sample it: `samples` rollouts of each of the
    first `prompts` tasks at `temperature`.

    Returns the share of tool calls that fail (`tool_failed_frac`: malformed JSON or boxes), the zoom
    rate, the share of answered rollouts, the accuracy, the share of successful zooms whose box is the
    tile of the card their reasoning names (`box_follows_name`), and on attribute items the shares of
    zooms that name the asked card (`names_target`) and that zoom into its tile (`zoom_on_target`,
    chance 1/cards), and the share of attribute rollouts whose first turn restates the asked card
    (`restates_target`: whether the model reads the question; 0 for a model trained without `restate`);
    and the counts of calls and episodes.
    """
    picked = list(tasks[:prompts])
    trajs = sampler([Prompt(image=tasks_lib.image_of(t), question=t.record["question"]) for t in picked],
                    samples, Sample(temperature=temperature), jax.random.key(seed))
    calls = failed = ok = follows = attr_zooms = on_target = names_target = answered = correct = zoomed = 0
    attr = restates = 0
    for i, tr in enumerate(trajs):
        task = picked[i // samples]
        syn = task.annotation["synthetic"]
        tiles = {c["frame"]: tasks_lib.tile_box(c["tile"]) for c in syn["cards"]}
        attribute = tasks_lib.asks_card(task)
        target = syn["cards"][syn["targets"][0]] if attribute else None
        zoomed += bool(tr.tool_calls)
        if attribute:
            attr += 1
            restates += bool(tr.turns) and tasks_lib.think_restate(task) in tr.turns[0]
        for call in tr.tool_calls:
            calls += 1
            if call.status != "ok":
                failed += 1
                continue
            ok += 1
            box = [round(v) for v in call.box_model]
            named = [f for f in tiles if tasks_lib.think_zoom(f) in tr.turns[call.turn]]
            follows += bool(named) and box == tiles[named[0]]
            if attribute:
                attr_zooms += 1
                on_target += box == tiles[target["frame"]]
                names_target += tasks_lib.think_zoom(target["frame"]) in tr.turns[call.turn]
        answered += tr.answer is not None
        correct += tr.answer is not None and (choices.answer_letter(tr.answer, task.record["options"])
                                              == task.record["answer"])  # as the rule judge reads it
    n = len(trajs)
    return {"tool_failed_frac": failed / max(calls, 1), "zoom_rate": zoomed / n, "answered": answered / n,
            "accuracy": correct / n, "box_follows_name": follows / max(ok, 1),
            "names_target": names_target / max(attr_zooms, 1),
            "zoom_on_target": on_target / max(attr_zooms, 1), "restates_target": restates / max(attr, 1),
            "calls": float(calls), "episodes": float(n)}


@nnx.jit
def _token_logprobs(model, mb: batch_lib.TrainBatch) -> jax.Array:
    return step_lib.policy_logprobs(model, mb)[0]


def first_turn_scores(sampler: Sampler, episodes: Sequence[tuple[tasks_lib.Task, str]], chunk: int = 32
                      ) -> np.ndarray:
    """Log-probabilities of first turns, teacher-forced: for each (task, turn), the whole turn (up to
    `</tool_call>` for a call, whose observation is not the model's) after the task's prompt. Each
    episode is laid out up to that turn only (`max_turns=1`): the observation's crop would follow the
    scored tokens, which do not attend to it, and would only cost its encoding."""
    trajs, spans, prompts = [], [], {}
    for t, turn in episodes:
        if id(t) not in prompts:  # one image decode per task, however many turns are scored on it
            prompts[id(t)] = Prompt(image=tasks_lib.image_of(t), question=t.record["question"])
        tr = forced.forced_trajectory(sampler, prompts[id(t)], [turn], max_turns=1)
        trajs.append(tr)
        spans.append((len(tr.prompt_ids), len(tr.input_ids)))  # the response is the turn alone
    scores = []
    for s in range(0, len(trajs), chunk):
        part = trajs[s:s + chunk]
        batch = batch_lib.pack(part, np.zeros(len(part), np.float32), sampler.model.cfg.vision, 1)
        logp = np.asarray(_token_logprobs(sampler.model, jax.tree.map(lambda x: x[0], batch)))
        # logp[:, i] is the log-prob of token i + 1
        scores += [logp[r, a - 1:b - 1].sum() for r, (a, b) in enumerate(spans[s:s + chunk])]
    return np.asarray(scores)


def tile_scores(sampler: Sampler, tasks: Sequence[tasks_lib.Task], chunk: int = 32) -> np.ndarray:
    """[len(tasks), tiles] log-probabilities of a first turn zooming (`tasks.THINK_LOOK`) into each tile of
    the scene lattice, teacher-forced (the whole turn, `<think>` to `</tool_call>`)."""
    n_tiles = int(np.prod(tasks_lib.SYNTHETIC.tiles))
    turns = [tasks_lib.zoom_turn(tasks_lib.tile_box(tile), tasks_lib.THINK_LOOK) for tile in range(n_tiles)]
    return first_turn_scores(sampler, [(t, turn) for t in tasks for turn in turns], chunk
                             ).reshape(len(tasks), n_tiles)


def full_view_reading(sampler: Sampler, tasks: Sequence[tasks_lib.Task], items: int, chunk: int = 32
                      ) -> dict[str, float]:
    """Whether the model can answer zoom-free items without zooming, teacher-forced: on the first
    `items` zoom-free items, the share whose most likely answering first turn (`tasks.answer_turn`, no
    zoom) gives the right option, per kind of item (`tasks.item_kind`: `attribute`, `relative`, `border`,
    against `chance_<kind>`: one over the options).

    Zooming pays nothing on an item the model reads from the full view, so this is what selective tool
    use needs first (BENCHMARKS.md, Mini-V* thirteenth runs).
    """
    picked = [t for t in tasks if not t.zoom_needed][:items]
    if not picked:
        raise ValueError("full_view_reading needs zoom-free items; none were given")
    scores = first_turn_scores(sampler, [(t, tasks_lib.answer_turn(tasks_lib.written(t, o)))
                                         for t in picked for o in t.record["options"]], chunk)
    right = {k: [] for k in ("attribute", "relative", "border")}
    chance = {k: [] for k in right}
    start = 0
    for t in picked:
        options = t.record["options"]
        best = options[int(np.argmax(scores[start:start + len(options)]))]
        start += len(options)
        kind = tasks_lib.item_kind(t)
        right[kind].append(best == tasks_lib.right_option(t))
        chance[kind].append(1 / len(options))
    out = {}
    for kind in right:
        out[kind] = float(np.mean(right[kind])) if right[kind] else float("nan")
        out[f"chance_{kind}"] = float(np.mean(chance[kind])) if chance[kind] else float("nan")
        out[f"items_{kind}"] = float(len(right[kind]))
    return out


def box_prior(sampler: Sampler, tasks: Sequence[tasks_lib.Task], items: int, chunk: int = 32
              ) -> dict[str, float]:
    """Where the model's first tool call looks, teacher-forced: on the first `items` attribute items,
    `tile_scores` normalised over the tiles.

    Greedy decoding picks a box token by token (the first digit of x1 first), so it can hide a
    preference for whole boxes that GRPO's samples see. Returns the mean probability of the asked
    card's tile (`asked_tile`), of the tiles holding a scene card (`card_tiles`), of the asked tile among
    those (`asked_among_cards`, against `chance_among_cards`: one over the cards), and the share of
    items whose most likely tile is the asked card's (`asked_most_likely`).
    """
    picked = [t for t in tasks if tasks_lib.asks_card(t)][:items]
    if not picked:
        raise ValueError("box_prior needs attribute items (one card asked about); none were given")
    scores = tile_scores(sampler, picked, chunk)
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    asked, cards, among, chance, top = [], [], [], [], []
    for t, p in zip(picked, probs, strict=True):
        syn = t.annotation["synthetic"]
        tiles = [c["tile"] for c in syn["cards"]]
        target = syn["cards"][syn["targets"][0]]["tile"]
        asked.append(p[target])
        cards.append(p[tiles].sum())
        among.append(p[target] / p[tiles].sum())
        chance.append(1 / len(tiles))
        top.append(int(np.argmax(p)) == target)
    return {"asked_tile": float(np.mean(asked)), "card_tiles": float(np.mean(cards)),
            "asked_among_cards": float(np.mean(among)), "chance_among_cards": float(np.mean(chance)),
            "asked_most_likely": float(np.mean(top)), "items": float(len(picked))}


def train(pre: Pretrained, tasks: Sequence[tasks_lib.Task], rollout: RolloutConfig, cfg: FormatConfig,
          mesh: jax.sharding.Mesh, rules: sharding.Rules,
          log: Callable[[int, dict[str, float]], None] | None = None) -> Pretrained:
    """Trains `pre.model` on captions, then format-stage episodes of `tasks`; returns `pre` with the
    trained model. Steps are numbered through both phases.

    The update is `rl/step.py`'s with `policy_loss="weighted_nll"` and advantage 1: the token-mean
    negative log-likelihood of the forced tokens.
    """
    ucfg = step_lib.UpdateConfig(lr=cfg.lr, weight_decay=0.0, remat=False, policy_loss="weighted_nll")
    optimizer = step_lib.make_optimizer(pre.model, ucfg)
    graphdef, state = nnx.split((pre.model, optimizer))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rollout)
    plain = Sampler(pre.model, pre.tokenizer, pre.image_processor,
                    dataclasses.replace(rollout, tools=(), max_turns=1))
    rng = np.random.default_rng(cfg.seed)
    pools = caption_pools(tasks)

    def build(step: int) -> tuple[str, list[Trajectory], batch_lib.TrainBatch, float]:
        t0 = time.perf_counter()
        if step < cfg.crop_first:
            kind = "crop"
        elif step < cfg.crop_first + cfg.ground_first:
            kind = "ground"
        elif step < cfg.pretrain_steps or (cfg.refresh and rng.random() < cfg.refresh):
            kind = str(rng.choice(tasks_lib.PRETRAIN_KINDS, p=np.asarray(cfg.kinds) / np.sum(cfg.kinds)))
        else:
            kind = "protocol"
        trajs = (episodes(sampler, tasks, rng, cfg.batch, cfg.zoom_prob, cfg.restate, cfg.name_zoom,
                          cfg.ground_calls, cfg.aim)
                 if kind == "protocol"
                 else captions(plain, tasks, rng, cfg.pretrain_batch, kind, pools, cfg.crop_as_observation))
        batch = batch_lib.pack(trajs, np.ones(len(trajs), np.float32), pre.config.vision, cfg.micro_batches,
                               length_multiple=cfg.length_multiple, window_multiple=cfg.window_multiple)
        return kind, trajs, batch, time.perf_counter() - t0

    programs = {}
    total = cfg.pretrain_steps + cfg.steps
    # The host builds step n + 1's batch (tokenising, cropping, packing) while the device runs step n.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(build, 0) if total else None
        for step in range(total):
            t0 = time.perf_counter()
            kind, trajs, batch, build_s = pending.result()
            t1 = time.perf_counter()
            compiled = step_lib.steps_for(programs, graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
            dev = compiled.place(batch)
            state, m = compiled.update(state, dev, None)
            if step + 1 < total:
                pending = pool.submit(build, step + 1)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            t2 = time.perf_counter()
            if log is not None:
                log(step + 1, {"format/nll": m["update/loss"], "format/grad_norm": m["update/grad_norm"],
                               "format/pretraining": float(step < cfg.pretrain_steps),
                               **{f"format/kind/{k}": float(k == kind) for k in KINDS},
                               "format/zoom_frac": float(np.mean([len(t.images) > 1 for t in trajs])),
                               "format/tokens": float(batch.attention_mask.size),
                               "time/build": build_s, "time/wait": t1 - t0, "time/update": t2 - t1,
                               "time/step": t2 - t0})
    model, _ = nnx.merge(graphdef, state)
    return dataclasses.replace(pre, model=model)
