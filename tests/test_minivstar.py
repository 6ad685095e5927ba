"""Mini-V*: tokenizer, model directory, tile scenes, format-stage turns and episodes, the NLL loss, and
the shortened end-to-end run of the README's first command (CI checks the pipeline, not learning)."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import FIXTURES
from deepeyes_jax.data import choices, readers, synthetic_vstar
from deepeyes_jax.minivstar import base, format_stage, run, tasks
from deepeyes_jax.minivstar import tokenizer as tok_lib
from deepeyes_jax.model import checkpoint, sharding
from deepeyes_jax.processing.chat import Tokenizer
from deepeyes_jax.rl import checkpoint as rl_ckpt
from deepeyes_jax.rl import grpo, metrics, rewards
from deepeyes_jax.sampling import Greedy, Prompt, RolloutConfig, Sampler, engine, forced

REPO = FIXTURES.parents[1]
# Mini-V*'s scenes with border items in place of the zoom-free attribute items (not the default)
BORDERS = dataclasses.replace(tasks.SYNTHETIC, border_frac=1.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("minivstar_base")
    cfg = base.model_config(hidden=64, layers=2, vision_hidden=32, vision_depth=2)
    return base.write_base(path, seed=0, max_pixels=tasks.SYNTHETIC.max_pixels, cfg=cfg)


def test_tokenizer_keeps_qwen_special_tokens_and_splits_digits(tmp_path):
    tok_lib.write(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for name in tok_lib.SPECIAL + tok_lib.NONSPECIAL:
        assert tok.encode(name) == [tok_lib.token_id(name)], name
    assert tok.special.image_pad == tok_lib.token_id("<|image_pad|>") == tok_lib.BASE_VOCAB + 12
    digits = tok.encode("[126, 56]")
    assert [tok.decode([i]) for i in digits] == ["[", "1", "2", "6", ",", " ", "5", "6", "]"]
    text = tasks.zoom_turn([63, 56, 126, 112], tasks.think_zoom("purple")) + tasks.answer_turn("C")
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(tasks.SYSTEM_PROMPT)) < 100  # the point of the short prompt
    assert tok_lib.build().to_str() == tok_lib.build().to_str()  # deterministic


def test_the_asked_frame_is_the_only_frame_word_of_a_question_and_one_token(tmp_path):
    """An attribute question names its card by a frame word that nothing else in the prompt uses (the
    options are stripe pairs), so the card asked about is readable by content."""
    tok_lib.write(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    frame_ids = {f: tok.encode(" " + f) for f in synthetic_vstar.FRAMES}
    assert all(len(ids) == 1 for ids in frame_ids.values()), frame_ids
    stripe_words = {w for pair in synthetic_vstar.PAIRS for w in pair.split(" and ")}
    assert not stripe_words & set(synthetic_vstar.FRAMES)
    attribute = [t for t in tasks.make_tasks(24, seed=3) if len(t.annotation["synthetic"]["targets"]) == 1]
    assert attribute
    for t in attribute:
        asked = t.annotation["synthetic"]["cards"][t.annotation["synthetic"]["targets"][0]]["frame"]
        ids = tok.encode(t.record["question"])
        present = [f for f, (i,) in frame_ids.items() if i in ids]
        assert present == [asked], (t.record["question"], present)


def test_base_directory_loads_like_a_hub_checkpoint(base_dir):
    pre = checkpoint.load_pretrained(base_dir)
    assert pre.config.image_token_id == pre.tokenizer.special.image_pad
    assert pre.config.text.vocab_size == base.VOCAB_ROWS >= pre.tokenizer.vocab_size
    assert pre.image_processor.config.max_pixels == tasks.SYNTHETIC.max_pixels


def test_tile_scenes_hide_the_detail_in_the_full_view_only(tmp_path):
    cfg = tasks.SYNTHETIC
    assert cfg.resized_hw == (168, 252)
    synthetic_vstar.write_dataset(tmp_path, 24, seed=5, cfg=cfg)
    assert all(it.error is None for it in readers.read_vstar(tmp_path))
    oracle = synthetic_vstar.oracle_check(tmp_path, margin=0.12)  # ~ the tile around the card
    need = oracle["zoom_needed/direct_attributes"]
    assert need["full_view"] <= 0.5 and need["full_view_decided"] == 0.0 and need["crop"] == 1.0
    assert all(v["full_view"] == 1.0 for k, v in oracle.items() if k.startswith("zoom_free"))


def test_tile_cards_fill_their_tiles_and_tints_differ():
    cfg = tasks.SYNTHETIC
    tints = {synthetic_vstar.tile_tint(t, cfg.tiles) for t in range(12)}
    assert len(tints) == 12
    for i in range(20):
        _, img, ann = synthetic_vstar.make_item(i, 0, cfg)
        for card in ann["synthetic"]["cards"]:
            tx, ty, tw, th = cfg.tile_box(card["tile"])
            x, y, w, h = card["box"]
            assert tx <= x and x + w <= tx + tw and ty <= y and y + h <= ty + th
            # the tile box grounds the card
            assert metrics.iou([tx, ty, tx + tw, ty + th], [x, y, x + w, y + h]) >= 0.6
            if len(ann["synthetic"]["targets"]) == 1:  # attribute scenes: a frame colour's own tile
                assert card["tile"] == synthetic_vstar.FRAME_TILES[card["frame"]]
    relative = [synthetic_vstar.make_item(i, 0, cfg)[2]["synthetic"] for i in range(40)]
    relative = [s for s in relative if len(s["targets"]) == 2]
    assert len({tuple(c["tile"] for c in s["cards"]) for s in relative}) > 2  # placed anywhere
    with pytest.raises(ValueError, match="frame_tiles=True"):
        synthetic_vstar.SyntheticConfig(frame_tiles=True)


def test_records_route_rewards_and_shuffle_options():
    ts = tasks.make_tasks(16, seed=2) + tasks.make_tasks(16, seed=2, cfg=BORDERS)
    for t in ts:
        r = t.record
        free = tasks.BORDER_SOURCE if tasks.item_kind(t) == "border" else tasks.FREE_SOURCE
        assert r["data_source"] == ("vstar" if t.zoom_needed else free)
        assert r["options"][choices.LETTERS.index(r["answer"])] == t.annotation["options"][0]
        text = tasks.answer_turn(t.annotation["options"][0])  # the option's text
        with_crop = rewards.score(r, text, 1, config=rewards.RewardConfig(judges={"vstar": "rule"}))
        assert with_crop.accuracy == 1.0
        assert with_crop.total == (2.0 if t.zoom_needed else 0.8)  # no tool term on zoom-free items
    assert len({t.record["answer"] for t in ts}) > 1
    assert {tasks.item_kind(t) for t in ts} == {"attribute", "relative", "border"}
    assert "border" not in {tasks.item_kind(t) for t in ts[:16]}  # not in the default


def test_format_turns_zoom_a_random_named_card_and_read_the_last_view():
    ts = tasks.make_tasks(40, seed=4) + tasks.make_tasks(40, seed=4, cfg=BORDERS)
    rng = np.random.default_rng(0)
    zoomed, hits = 0, 0
    after_zoom = set()  # what border items answer after a zoom
    for t in ts:
        syn = t.annotation["synthetic"]
        for _ in range(5):
            turns = tasks.format_turns(t, rng, zoom_prob=0.5)
            said = turns[-1].split("<answer>")[1].split("</answer>")[0]
            if tasks.is_relative(t):  # relative items answer with a letter (tasks.written)
                said = t.record["options"][choices.LETTERS.index(said)]
            assert said in t.record["options"]
            right = said == t.annotation["options"][0]
            if len(turns) == 1:
                if not t.zoom_needed:
                    assert right
                continue
            zoomed += 1
            call = json.loads(turns[0].split("<tool_call>\n")[1].split("\n</tool_call>")[0])
            tile = [tasks.tile_box(i) for i in range(12)].index(call["arguments"]["bbox_2d"])
            card = next(c for c in syn["cards"] if c["tile"] == tile)  # a box around some card
            assert turns[0].startswith(f"<think>{tasks.think_zoom(card['frame'])}</think>")  # named
            if len(syn["targets"]) == 1:  # it reads the card it zoomed into, asked about or not
                assert said == card["stripes"]
                hits += card is syn["cards"][syn["targets"][0]]
            if tasks.item_kind(t) == "border":
                after_zoom.add(said == t.annotation["options"][0])
    assert 100 < zoomed < 300 and 0 < hits < zoomed
    assert after_zoom == {True, False}  # an arbitrary option: one tile's crop cannot show the border


def test_restate_says_what_the_question_asks_and_still_zooms_at_random():
    ts = tasks.make_tasks(40, seed=4)
    rng = np.random.default_rng(0)
    named_target = zooms = 0
    for t in ts:
        asked = t.annotation["target_object"]
        lead = f"<think>The question asks about the {' and the '.join(asked)}. "
        for _ in range(5):
            turns = tasks.format_turns(t, rng, zoom_prob=0.8, restate=True)
            assert turns[0].startswith(lead)
            assert all(name.removeprefix("card ") in t.record["question"] for name in asked)  # its words
            if len(turns) == 1:
                assert turns[0].startswith(lead + tasks.THINK_ANSWER + "</think>")
                continue
            syn = t.annotation["synthetic"]
            if len(syn["targets"]) == 1:
                zooms += 1
                named_target += tasks.think_zoom(syn["cards"][syn["targets"][0]]["frame"]) in turns[0]
    assert 0 < named_target < zooms / 2  # the zoom names a random card of the scene, not the asked one
    # without restate the turns are the same draws minus the restated sentence
    a = tasks.format_turns(ts[0], np.random.default_rng(5), 1.0, restate=True)
    b = tasks.format_turns(ts[0], np.random.default_rng(5), 1.0)
    assert [x.replace(tasks.think_restate(ts[0]) + " ", "") for x in a] == b
    # without name, the same draws with a zoom reasoning that names no card
    c = tasks.format_turns(ts[0], np.random.default_rng(5), 1.0, name=False)
    named = [f for f in synthetic_vstar.FRAMES if tasks.think_zoom(f) in b[0]]
    assert len(named) == 1 and c == [b[0].replace(tasks.think_zoom(named[0]), tasks.THINK_LOOK), b[1]]
    assert not any(f in c[0] for f in synthetic_vstar.FRAMES)


def test_aim_sends_that_share_of_attribute_zooms_into_the_asked_card():
    ts = tasks.make_tasks(40, seed=2, cfg=BORDERS)
    attr = [t for t in ts if len(t.annotation["synthetic"]["targets"]) == 1]
    relative = [t for t in ts if len(t.annotation["synthetic"]["targets"]) == 2]

    def on_target(t, turns):
        syn = t.annotation["synthetic"]
        box = tasks.tile_box(syn["cards"][syn["targets"][0]]["tile"])
        return tasks.zoom_turn(box, tasks.THINK_LOOK) == turns[0]

    rng = np.random.default_rng(0)
    hits = [on_target(t, tasks.format_turns(t, rng, 1.0, name=False, aim=a))
            for a in (0.0, 1.0) for t in attr]
    assert sum(hits[len(attr):]) == len(attr) and sum(hits[:len(attr)]) < 0.7 * len(attr)
    # relative and border items (no one card asked about) stay random
    border = [t for t in ts if tasks.item_kind(t) == "border"]
    assert relative and border
    for t in relative + border:
        assert (tasks.format_turns(t, np.random.default_rng(1), 1.0, aim=1.0)
                == tasks.format_turns(t, np.random.default_rng(1), 1.0))


def test_relative_items_answer_with_the_letter_and_attribute_items_with_the_text():
    ts = tasks.make_tasks(40, seed=3)
    relative = [t for t in ts if tasks.is_relative(t)]
    free_attr = [t for t in ts if not t.zoom_needed and not tasks.is_relative(t)]
    assert relative and free_attr
    rng = np.random.default_rng(0)
    answer = lambda turn: turn.split("<answer>")[1].split("</answer>")[0]
    for t in relative:
        _, _, turn = tasks.pretrain_example(t, "full_view", rng)
        assert answer(turn) == t.record["answer"]  # the right letter, as the rule judge reads it
        assert choices.answer_letter(answer(turn), t.record["options"]) == t.record["answer"]
        said = {answer(tasks.format_turns(t, rng, zoom_prob=z)[-1]) for z in (0.0, 1.0) for _ in range(8)}
        assert said <= set(choices.LETTERS[:len(t.record["options"])])
        assert t.record["answer"] in said  # without a zoom: the full view's right letter
    for t in free_attr:
        _, _, turn = tasks.pretrain_example(t, "full_view", rng)
        assert answer(turn) == tasks.right_option(t) and len(answer(turn)) > 1


def test_pretrain_captions_show_what_the_view_holds(base_dir):
    ts = tasks.make_tasks(24, seed=2)
    rng = np.random.default_rng(1)
    attr = next(t for t in ts if len(t.annotation["synthetic"]["targets"]) == 1)
    image, question, turn = tasks.pretrain_example(attr, "crop", rng)
    said = turn.split("<answer>")[1].split("</answer>")[0]
    card = next(c for c in attr.annotation["synthetic"]["cards"] if c["stripes"] == said)
    x, y, w, h = tasks.SYNTHETIC.tile_box(card["tile"])
    assert image.size == (w, h) and question == tasks.CROP_QUESTION
    np.testing.assert_array_equal(np.asarray(image), np.asarray(tasks.image_of(attr))[y:y + h, x:x + w])
    _, question, turn = tasks.pretrain_example(attr, "ground", rng)
    frame = question.split("with the ")[1].split(" frame")[0]
    card = next(c for c in attr.annotation["synthetic"]["cards"] if c["frame"] == frame)
    assert turn.endswith("<|im_end|>")  # bare JSON, as Qwen2.5-VL grounds
    assert json.loads(turn.removesuffix("<|im_end|>"))["bbox_2d"] == tasks.tile_box(card["tile"])
    reads = [tasks.pretrain_example(attr, "read", rng) for _ in range(8)]  # what the question asks about
    assert {q for _, q, _ in reads} == {attr.record["question"], attr.annotation["question"]}  # +- options
    assert all(t == tasks.think_restate(attr) + "<|im_end|>" for _, _, t in reads)
    assert all(i.size == tasks.image_of(attr).size for i, _, _ in reads)
    relative = next(t for t in ts if len(t.annotation["synthetic"]["targets"]) == 2)
    with pytest.raises(ValueError, match="attribute item"):
        tasks.pretrain_example(relative, "read", rng)
    need = next(t for t in ts if t.zoom_needed)
    with pytest.raises(ValueError, match="zoom-free"):
        tasks.pretrain_example(need, "full_view", rng)
    with pytest.raises(ValueError, match="kind="):
        tasks.pretrain_example(attr, "caption", rng)
    mesh = sharding.make_mesh((1, -1, 1))
    pre = checkpoint.load_pretrained(base_dir, mesh=mesh, rules=sharding.get_rules("fsdp"))
    plain = Sampler(pre.model, pre.tokenizer, pre.image_processor, RolloutConfig(tools=(), max_turns=1))
    caps = [c for kind in tasks.PRETRAIN_KINDS
            for c in format_stage.captions(plain, ts, np.random.default_rng(0), 4, kind)]
    with pytest.raises(KeyError):
        format_stage.captions(plain, ts, np.random.default_rng(0), 4, "caption")
    for c in caps:  # no system prompt, no tool protocol: one user turn with the image, one answer
        text = pre.tokenizer.decode(c.prompt_ids.tolist())
        assert "# Tools" not in text and "<|vision_start|>" in text and len(c.images) == 1
        assert (c.action_mask == 1).all()
    # crops and full views answer; the bare grounding JSON and the read sentence end without an answer
    assert [c.stop_reason for c in caps] == (["answer"] * 4 + ["tools_disabled"] * 4 + ["answer"] * 4
                                             + ["tools_disabled"] * 4)


def _format_setup(base_dir):
    mesh = sharding.make_mesh((1, -1, 1))
    pre = checkpoint.load_pretrained(base_dir, mesh=mesh, rules=sharding.get_rules("fsdp"))
    rc = RolloutConfig(max_turns=3, max_turn_tokens=96, max_response_tokens=384, max_forced_tokens=96,
                       system_prompt=tasks.SYSTEM_PROMPT)
    return mesh, pre, Sampler(pre.model, pre.tokenizer, pre.image_processor, rc)


def test_host_built_episodes_equal_the_samplers_forced_rollouts(base_dir):
    mesh, pre, sampler = _format_setup(base_dir)
    ts = tasks.make_tasks(6, seed=1)
    rng = np.random.default_rng(0)
    turns = [tasks.format_turns(t, rng, 0.6) for t in ts]
    turns[0] = [tasks.zoom_turn([0, 0, 5, 5], "x"), tasks.answer_turn("red and cyan")]  # a failing call
    prompts = [Prompt(image=tasks.image_of(t), question=t.record["question"]) for t in ts]
    with jax.set_mesh(mesh):
        ref = sampler(prompts, 1, Greedy(), jax.random.key(0), forced=turns)
    kinds = set()
    for p, tt, r in zip(prompts, turns, ref, strict=True):
        h = forced.forced_trajectory(sampler, p, tt)
        kinds.add((len(h.images), tuple(c.status for c in h.tool_calls)))
        for name in ("input_ids", "positions", "source", "image_grid_thw", "pixel_values"):
            np.testing.assert_array_equal(getattr(h, name), getattr(r, name), err_msg=name)
        assert (h.stop_reason, h.answer, h.turns) == (r.stop_reason, r.answer, r.turns)
        assert [(c.status, c.box_original) for c in h.tool_calls] == [(c.status, c.box_original)
                                                                       for c in r.tool_calls]
    assert {(1, ("error",)), (2, ("ok",)), (1, ())} <= kinds
    with pytest.raises(ValueError, match="follows the end"):
        forced.forced_trajectory(sampler, prompts[1], [tasks.answer_turn("x"), tasks.answer_turn("y")])
    # max_turns=1: the zoom turn alone, its call run but no observation (the prefix of the whole episode)
    k = next(i for i, h in enumerate(ref) if len(h.images) == 2)
    whole = forced.forced_trajectory(sampler, prompts[k], turns[k])
    first = forced.forced_trajectory(sampler, prompts[k], turns[k][:1], max_turns=1)
    n = len(first.input_ids)
    assert (first.stop_reason, len(first.images), [c.status for c in first.tool_calls]) == (
        "max_turns", 1, ["ok"])
    assert (first.source == engine.FORCED).all() and (whole.source == engine.OBSERVATION).any()
    np.testing.assert_array_equal(first.input_ids, whole.input_ids[:n])
    np.testing.assert_array_equal(first.positions, whole.positions[:, :n])
    with pytest.raises(ValueError, match="follows the end"):
        forced.forced_trajectory(sampler, prompts[k], turns[k], max_turns=1)


def test_format_episodes_mask_exactly_the_forced_tokens(base_dir):
    _, pre, sampler = _format_setup(base_dir)
    trajs = format_stage.episodes(sampler, tasks.make_tasks(6, seed=1), np.random.default_rng(3), 4, 1.0)
    for t in trajs:  # all zoom
        assert t.stop_reason == "answer" and len(t.images) == 2 and t.tool_calls[0].status == "ok"
        forced_ids = t.response_ids[t.action_mask > 0]
        assert (t.action_mask == (t.source == engine.FORCED)).all()
        text = pre.tokenizer.decode(forced_ids.tolist())
        assert re.match(rf"<think>Zoom in on the ({'|'.join(synthetic_vstar.FRAMES)}) card\.</think>", text)
        assert text.endswith("</answer><|im_end|>")
    # Grounding calls: asked where a card is, the episode zooms into that card's tile, reads its stripes.
    ts = tasks.make_tasks(6, seed=1)
    for t in format_stage.episodes(sampler, ts, np.random.default_rng(5), 4, 0.0, ground_calls=1.0):
        prompt = pre.tokenizer.decode(t.prompt_ids.tolist())
        frame = re.search(r"Where is the card with the (\w+) frame\?", prompt)[1]
        pixels = np.asarray(t.pil_images[0])
        scene = next(x for x in ts if np.array_equal(pixels, np.asarray(tasks.image_of(x))))
        card = next(c for c in scene.annotation["synthetic"]["cards"] if c["frame"] == frame)
        assert list(t.tool_calls[0].box_model) == tasks.tile_box(card["tile"]) and t.answer == card["stripes"]
        assert (t.action_mask == (t.source == engine.FORCED)).all() and t.stop_reason == "answer"


def test_crop_caption_as_observation_is_the_protocols_observation_and_answer(base_dir):
    _, pre, sampler = _format_setup(base_dir)
    ts = tasks.make_tasks(6, seed=1)
    plain = Sampler(pre.model, pre.tokenizer, pre.image_processor, RolloutConfig(tools=(), max_turns=1))
    (cap,) = format_stage.captions(plain, ts, np.random.default_rng(4), 1, "crop", crop_as_observation=True)
    # The caption's card: the one whose tile crop it shows.
    t, card = next((t, c) for t in ts for c in t.annotation["synthetic"]["cards"]
                   if np.array_equal(cap.pixel_values, plain.processor(tasks.image_of(t).crop(
                       _xyxy(tasks.SYNTHETIC.tile_box(c["tile"])))).pixel_values))
    # The protocol episode zooming into that card: its observation (after the <|im_end|> that closes the
    # calling turn) is the caption's prompt, its answer turn the caption's response, its crop the image.
    turns = [tasks.zoom_turn(tasks.tile_box(card["tile"]), tasks.think_zoom(card["frame"])),
             tasks.answer_turn(card["stripes"])]
    prompt = Prompt(image=tasks.image_of(t), question=t.record["question"])
    ep = forced.forced_trajectory(sampler, prompt, turns)
    obs = ep.response_ids[ep.source == engine.OBSERVATION]
    assert obs[0] == pre.tokenizer.special.im_end
    np.testing.assert_array_equal(cap.prompt_ids, obs[1:])
    answer = ep.response_ids[ep.source == engine.FORCED][-len(cap.response_ids):]
    np.testing.assert_array_equal(cap.response_ids, answer)
    np.testing.assert_array_equal(cap.pixel_values, ep.images[1].pixel_values)
    assert pre.tokenizer.decode(cap.response_ids.tolist()) == tasks.answer_turn(card["stripes"])
    assert len(cap.images) == 1 and (cap.action_mask == 1).all() and cap.stop_reason == "answer"


def _xyxy(box):
    x, y, w, h = box
    return x, y, x + w, y + h


def test_weighted_nll_is_the_negative_log_likelihood_gradient():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.125]]))
    adv = jnp.ones_like(logp)
    loss, _ = grpo.weighted_nll_loss(logp, logp + 3.0, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    np.testing.assert_allclose(loss, -logp)
    g = jax.grad(lambda x: grpo.weighted_nll_loss(x, x, adv, clip_low=0.2, clip_high=0.2,
                                                  dual_clip=None)[0].sum())(logp)
    np.testing.assert_allclose(g, -np.ones((1, 3)))


def _run(args, timeout=900):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_grpo_stage_is_done_only_when_its_last_step_is_saved(tmp_path, monkeypatch):
    """A SIGTERM makes the trainer save and return early: the stage must not be marked done then."""
    g, d, saved = ml_collections.ConfigDict({"steps": 3}), str(tmp_path / "grpo"), []

    def fake_trainer(cfg, workdir):
        ck = rl_ckpt.Checkpointer(workdir, async_save=False)
        for step in saved:
            ck.save(step, {"w": np.zeros(2)}, {"m": np.zeros(2)}, {"step": step}, force=True)
        ck.close()

    monkeypatch.setattr(run.trainer, "run", fake_trainer)
    saved[:] = [1]
    with pytest.raises(SystemExit, match="step 1 of 3 .preempted.; rerun"):
        run.grpo(g, d)
    assert not run._done(d)
    saved[:] = [2, 3]
    run.grpo(g, d)
    assert run._done(d)
    monkeypatch.setattr(run.trainer, "run", lambda *a: pytest.fail("a finished stage ran again"))
    run.grpo(g, d)


@pytest.mark.slow
def test_shortened_mini_vstar_and_ablation_end_to_end(tmp_path):
    """The README's first command at size=ci, then the ablation launcher reusing its shared stages."""
    run_dir, abl = tmp_path / "run", tmp_path / "ablation"
    out = _run(["launch/mini_vstar.py", "--config=configs/mini_vstar.py:size=ci", f"--workdir={run_dir}"])
    assert "wrote" in out and "| accuracy |" in out
    for name in ("dynamics.png", "summary.md", "summary.json", "view.html", "heldout/oracle.json",
                 "format/metrics.jsonl", "eval_start/results.json", "eval_end/results.md",
                 "grpo/metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["start"]) == set(summary["end"]) >= {"accuracy", "zoom_needed/zoom_rate",
                                                              "zoom_free/zoom_rate"}
    assert summary["box_prior"]["items"] >= 1 and "full_view_reading" in (run_dir / "summary.md").read_text()
    reading = summary["full_view"]
    assert reading["items_attribute"] + reading["items_relative"] + reading["items_border"] >= 1
    kinds = summary["zoom_by_kind"]  # every held-out item, counted once, at both ends
    assert kinds["start"].keys() == kinds["end"].keys() and kinds["end"] == run.zoom_by_kind(
        str(run_dir / "eval_end"))
    held = json.loads((run_dir / "heldout/synthetic_vstar.json").read_text())["num"]
    assert all(sum(n for _, n in k.values()) == held for k in kinds.values())
    assert "by kind (`run.zoom_by_kind`)" in (run_dir / "summary.md").read_text()
    assert summary["probe"]["episodes"] == 4 and "sampled at the GRPO temperature 0.5" in (
        run_dir / "summary.md").read_text()  # size=ci: 2 prompts x 2 samples
    needed = json.loads((run_dir / "heldout/synthetic_vstar.json").read_text())["counts"]["zoom_needed"]
    for aim in summary["aim_by_frame"].values():  # every zoom-needed held-out item, counted once
        assert sum(n for _, n in aim.values()) == needed
    steps = [json.loads(line) for line in (run_dir / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    quarters = summary["zoom_by_quarter"]  # 2 steps: two "quarters" of one step each
    assert quarters and all(len(q) == 2 for q in quarters.values())
    assert quarters == run.zoom_by_quarter(str(run_dir / "grpo/metrics.jsonl"))
    assert "by quarter of the steps" in (run_dir / "summary.md").read_text()
    assert [s["groups/updated"] for s in steps] == [1, 1]  # of the 2 sampled (optim.update_groups)
    assert any(k.startswith("tools/zoom_rate/") for k in steps[0])
    html = (run_dir / "view.html").read_text()
    assert html.count("<img") >= 8  # every held-out item's image
    out = _run(["launch/mini_vstar_ablation.py", "--config=configs/mini_vstar.py:size=ci",
                f"--workdir={abl}", f"--shared={run_dir}", "--variants=none"])
    assert (abl / "ablation.png").is_file() and "| none |" in (abl / "ablation.md").read_text()
    assert not (abl / "common").exists()  # the shared stages were reused, not redone
    took = json.loads((abl / "none" / "summary.json").read_text())["seconds"]
    for stage in ("data+base", "format", "eval_start"):  # reused: the time they took, not 0
        assert took[stage] == summary["seconds"][stage] > 0, stage


def test_aim_by_frame_counts_first_zooms_into_the_asked_card(tmp_path):
    def row(i, frame, ious, zoom_needed=True, order="shuffled"):
        calls = [{"status": "ok" if iou is not None else "error", **({"iou": iou} if iou is not None else {})}
                 for iou in ious]
        return {"id": f"direct_attributes/syn_{i:05d}", "order": order, "zoom_needed": zoom_needed,
                "question": f"Question: Which two colors make up the stripes on the card with the {frame} "
                            "frame?\nOptions: \nA. red and cyan\n", "tool_calls": calls}

    rows = [row(0, "gold", [0.7]), row(1, "gold", [0.0, 0.7]),  # the first zoom decides
            row(2, "gold", [None, 0.66]),  # a failed call is no zoom: the first successful one counts
            row(3, "lime", []), row(4, "lime", [0.5]),
            row(5, "white", [0.0], zoom_needed=False),  # zoom-free: not counted
            row(6, "white", [0.8], order="original")]  # another option order: not counted
    (tmp_path / "mini_vstar").mkdir()
    (tmp_path / "mini_vstar" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run.aim_by_frame(str(tmp_path)) == {"gold": [2, 3], "lime": [1, 2]}
    assert list(run.aim_by_frame(str(tmp_path))) == ["gold", "lime"]  # best aimed first
    assert run.aim_by_frame(str(tmp_path), order="original") == {"white": [1, 1]}
    rows.append(row(7, "gold", [0.7]) | {"question": "Is the card with red and cyan stripes above..."})
    (tmp_path / "mini_vstar" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="no frame named"):
        run.aim_by_frame(str(tmp_path))


def test_zoom_by_kind_counts_zoomed_items_per_kind(tmp_path):
    def row(i, question, category, zoom_needed, statuses, order="shuffled"):
        return {"id": f"{category}/syn_{i:05d}", "order": order, "zoom_needed": zoom_needed,
                "category": category, "question": f"Question: {question}\nOptions: \nA. x\n",
                "tool_calls": [{"status": s} for s in statuses]}

    stripes = "Which two colors make up the stripes on the card with the gold frame?"
    border = "What color is the border of the picture?"
    relative = "Is the card with red and cyan stripes above or below the card with blue and yellow stripes?"
    rows = [row(0, stripes, "direct_attributes", True, ["ok"]),
            row(1, stripes, "direct_attributes", True, ["error"]),  # a failed call is no zoom
            row(2, stripes, "direct_attributes", False, []),
            row(3, border, "direct_attributes", False, ["error", "ok"]),
            row(4, border, "direct_attributes", False, []),
            row(5, relative, "relative_position", False, ["ok"]),
            row(6, border, "direct_attributes", False, ["ok"], order="original")]  # another order
    (tmp_path / "mini_vstar").mkdir()
    (tmp_path / "mini_vstar" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run.zoom_by_kind(str(tmp_path)) == {"zoom_free/attribute": [0, 1], "zoom_free/border": [1, 2],
                                               "zoom_free/relative": [1, 1], "zoom_needed": [1, 2]}
    assert run.zoom_by_kind(str(tmp_path), order="original") == {"zoom_free/border": [1, 1]}


def test_zoom_by_quarter_averages_each_sources_training_zoom_rate(tmp_path):
    rows = [{"step": i + 1, "tools/zoom_rate/vstar": i / 10, "reward/acc": 0.5} for i in range(10)]
    for i in (0, 1, 5):  # steps whose batch held zoom-free prompts
        rows[i]["tools/zoom_rate/minivstar_free"] = 1.0 - i / 10
    path = tmp_path / "metrics.jsonl"
    resumed = [dict(r, **{"tools/zoom_rate/vstar": 9.0}) for r in rows[4:6]]  # steps 5-6, redone after
    path.write_text("".join(json.dumps(r) + "\n" for r in resumed + rows) + "\n")  # a stop: last wins
    got = run.zoom_by_quarter(str(path))
    assert got.keys() == {"vstar", "minivstar_free"}
    np.testing.assert_allclose(got["vstar"], [0.1, 0.4, 0.65, 0.85])  # steps 1-3, 4-6, 7-8, 9-10
    assert got["minivstar_free"][2:] == [None, None]  # no zoom-free prompt after step 6
    np.testing.assert_allclose(got["minivstar_free"][:2], [0.95, 0.5])
    path.write_text(json.dumps(rows[0]) + "\n")  # fewer steps than quarters
    assert run.zoom_by_quarter(str(path))["vstar"] == [0.0]


def test_summary_leaves_out_what_a_run_did_not_measure(tmp_path):
    report = {"benchmarks": {"mini_vstar": {"summary": {"shuffled": {
        "accuracy": 0.5, "zoom_rate": 0.25, "calls_per_item": 0.25,
        "zoom_split": {"zoom_needed": {"accuracy": 0.4, "zoom_rate": 0.5, "iou_mean": 0.6}}}}}}}
    reading = {"attribute": float("nan"), "chance_attribute": float("nan"), "items_attribute": 0.0,
               "relative": 0.5, "chance_relative": 0.5, "items_relative": 4.0}
    kinds = ({"zoom_free/border": [3, 4], "zoom_needed": [0, 8]}, {"zoom_free/border": [0, 4]})
    out = run.summarize(report, report, {"grpo": 1.0}, str(tmp_path / "summary"), "test", reading=reading,
                        quarters={"vstar": [0.25, 0.5], "minivstar_free": [None, 1.0]}, kinds=kinds)
    text = (tmp_path / "summary.md").read_text()
    assert "right on 0.500 of 4 relative items (chance 0.500)." in text and "attribute items" not in text
    assert "vstar 0.25 -> 0.50; minivstar_free - -> 1.00." in text
    assert "| zoom_free/accuracy | - | - | - |" in text  # no zoom-free items evaluated
    assert "by kind (`run.zoom_by_kind`): zoom_free/border 3/4 -> 0/4; zoom_needed 0/8 -> 0/0." in text
    assert out["zoom_by_kind"] == {"start": kinds[0], "end": kinds[1]}
    assert json.loads((tmp_path / "summary.json").read_text())["zoom_by_quarter"] == out["zoom_by_quarter"]


def test_probe_counts_failed_calls_named_boxes_and_target_zooms():
    ts = [t for t in tasks.make_tasks(30, seed=3) if len(t.annotation["synthetic"]["targets"]) == 1][:2]

    def rollout(task, card, box=None, fail=False, answer=None, lead=""):
        if card is None:
            return types.SimpleNamespace(tool_calls=[], turns=[tasks.answer_turn("x", lead + "ok")],
                                         answer=answer)
        box = tasks.tile_box(card["tile"]) if box is None else box
        call = types.SimpleNamespace(turn=0, status="error" if fail else "ok",
                                     box_model=None if fail else box)
        return types.SimpleNamespace(tool_calls=[call], answer=answer,
                                     turns=[tasks.zoom_turn(box, lead + tasks.think_zoom(card["frame"])),
                                            "a"])

    def fake_sampler(prompts, n, method, key):
        assert n == 4 and method.temperature == 0.5 and len(prompts) == 2
        out = []
        for t in ts:
            cards = t.annotation["synthetic"]["cards"]
            target, other = cards[0], cards[1]  # targets == [0]
            wrong = tasks.restate([f"card with the {other['frame']} frame"]) + " "
            out += [rollout(t, target, answer=tasks.right_option(t)),  # named, on target, right
                    rollout(t, other, box=tasks.tile_box(target["tile"]), lead=wrong),  # boxes another
                    rollout(t, other, fail=True),
                    rollout(t, None, answer="no", lead=tasks.think_restate(t) + " ")]  # reads the question
        return out

    p = format_stage.probe(fake_sampler, ts, 2, 4, 0.5)
    assert p == {"tool_failed_frac": 2 / 6, "zoom_rate": 6 / 8, "answered": 4 / 8, "accuracy": 2 / 8,
                 "box_follows_name": 2 / 4, "names_target": 2 / 4, "zoom_on_target": 4 / 4,
                 "restates_target": 2 / 8, "calls": 6.0, "episodes": 8.0}


def test_box_prior_scores_each_tiles_zoom_turn_as_the_sampler_does(base_dir):
    mesh, pre, sampler = _format_setup(base_dir)
    pre.model.embed[...] = pre.model.embed[...] * 50  # peaked next-token distributions (tied head)
    ts = tasks.make_tasks(12, seed=2, cfg=BORDERS)
    attr = [t for t in ts if tasks.asks_card(t)]
    assert len(attr) < len(ts)  # relative and border items are skipped
    with jax.set_mesh(mesh):
        got = format_stage.box_prior(sampler, ts, 1, chunk=5)  # chunks of 5: the 12 tiles in 3 batches
        raw = format_stage.tile_scores(sampler, attr[:1], chunk=5)[0]
        # the same turns forced through the sampler's own decoding, which records each token's log-prob
        t = attr[0]
        turns = [[tasks.zoom_turn(tasks.tile_box(i), tasks.THINK_LOOK)] for i in range(12)]
        trajs = sampler([Prompt(image=tasks.image_of(t), question=t.record["question"])] * 12, 1, Greedy(),
                        jax.random.key(0), forced=turns)
    scores = np.array([tr.logprobs[:int(np.argmin(tr.source == engine.FORCED))].sum() for tr in trajs])
    np.testing.assert_allclose(raw, scores, rtol=1e-4, atol=1e-3)  # the whole turn's log-prob per tile
    p = np.exp(scores - scores.max())
    p /= p.sum()
    syn = t.annotation["synthetic"]
    tiles, target = [c["tile"] for c in syn["cards"]], syn["cards"][syn["targets"][0]]["tile"]
    want = {"asked_tile": p[target], "card_tiles": p[tiles].sum(),
            "asked_among_cards": p[target] / p[tiles].sum(), "chance_among_cards": 1 / len(tiles),
            "asked_most_likely": float(np.argmax(p) == target), "items": 1}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-3, atol=1e-4, err_msg=k)
    with pytest.raises(ValueError, match="attribute items"):
        format_stage.box_prior(sampler, [t for t in ts if not tasks.asks_card(t)], 4)


def test_full_view_reading_picks_each_zoom_free_items_likeliest_answer(base_dir):
    mesh, pre, sampler = _format_setup(base_dir)
    pre.model.embed[...] = pre.model.embed[...] * 50  # peaked next-token distributions (tied head)
    ts = tasks.make_tasks(16, seed=2) + tasks.make_tasks(16, seed=2, cfg=BORDERS)
    free = [t for t in ts if not t.zoom_needed]
    assert len(free) < len(ts) and {tasks.item_kind(t) for t in free} == {"attribute", "relative", "border"}
    with jax.set_mesh(mesh):
        got = format_stage.full_view_reading(sampler, ts, len(free), chunk=3)
        right = {"attribute": [], "relative": [], "border": []}
        for t in free:  # each option's answer forced through the sampler, which records its log-probs
            options = t.record["options"]
            trajs = sampler([Prompt(image=tasks.image_of(t), question=t.record["question"])] * len(options),
                            1, Greedy(), jax.random.key(0),
                            forced=[[tasks.answer_turn(tasks.written(t, o))] for o in options])
            assert all((tr.source == engine.FORCED).all() and tr.stop_reason == "answer" for tr in trajs)
            scores = [tr.logprobs.sum() for tr in trajs]
            right[tasks.item_kind(t)].append(
                options[int(np.argmax(scores))] == tasks.right_option(t))
    want = {**{k: np.mean(v) for k, v in right.items()}, **{f"items_{k}": len(v) for k, v in right.items()},
            "chance_attribute": 0.25, "chance_relative": 0.5, "chance_border": 0.25}
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="zoom-free items"):
        format_stage.full_view_reading(sampler, [t for t in ts if t.zoom_needed], 4)


def test_format_train_runs_crops_first_then_the_kind_weights_then_the_protocol(base_dir, monkeypatch):
    packed = []  # the padding each step's batch was packed with
    pack = format_stage.batch_lib.pack
    monkeypatch.setattr(format_stage.batch_lib, "pack", lambda *a, **k: packed.append(
        (k.get("length_multiple"), k.get("window_multiple"))) or pack(*a, **k))
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.get_rules("fsdp")
    pre = checkpoint.load_pretrained(base_dir, mesh=mesh, rules=rules)
    rc = RolloutConfig(max_turns=3, max_turn_tokens=96, max_response_tokens=384,
                       system_prompt=tasks.SYSTEM_PROMPT)
    cfg = format_stage.FormatConfig(steps=5, batch=2, pretrain_steps=4, pretrain_batch=2, crop_first=1,
                                    ground_first=2, kinds=(0.0, 0.0, 0.0, 1.0), refresh=0.5, restate=True,
                                    length_multiple=64, window_multiple=3)
    logged = []
    format_stage.train(pre, tasks.make_tasks(8, 0), rc, cfg, mesh, rules, lambda s, m: logged.append((s, m)))
    kinds = [next(k for k in format_stage.KINDS if m[f"format/kind/{k}"]) for _, m in logged]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert kinds[:4] == ["crop", "ground", "ground", "read"]  # crops, then grounding, then `kinds`
    # `refresh`: about half the protocol-phase steps are caption steps again (drawn with `kinds`)
    assert set(kinds[4:]) == {"read", "protocol"}
    assert all(m["format/pretraining"] == (i < 4) for i, (_, m) in enumerate(logged))
    assert all(np.isfinite(m["format/nll"]) and m["time/build"] > 0 for _, m in logged)
    assert packed == [(64, 3)] * 9
    with pytest.raises(ValueError, match="window_multiple=-32"):
        format_stage.FormatConfig(window_multiple=-32)
    with pytest.raises(ValueError, match="crop_first=4"):
        format_stage.FormatConfig(pretrain_steps=3, crop_first=4)
    with pytest.raises(ValueError, match="ground_first=3"):
        format_stage.FormatConfig(pretrain_steps=3, crop_first=1, ground_first=3)
    with pytest.raises(ValueError, match="kinds="):
        format_stage.FormatConfig(kinds=(0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="refresh=1"):
        format_stage.FormatConfig(refresh=1.0)
