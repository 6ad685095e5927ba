"""Mini-V*: DeepEyes' training dynamics at CPU size (the README's first command).

  .venv/bin/python launch/mini_vstar.py --config=configs/mini_vstar.py --workdir=/tmp/mini_vstar
  ... --config=configs/mini_vstar.py:variant=none          # ablation: no tool reward
  ... --config=configs/mini_vstar.py:variant=unconditional # ablation: tool reward without the condition
  ... --config=configs/mini_vstar.py:size=ci               # a few steps of everything (the CI check)

Stages (deepeyes_jax/minivstar/run.py): synthetic V*-style data -> a random tiny Qwen2.5-VL ->
format stage (the stand-in for pretraining) -> GRPO with the DeepEyes reward -> evaluation on held-out
items -> dynamics figure and summary. `grpo` is a full `configs/deepeyes.py` config: every
`--config.grpo.*` flag of the real recipe applies.
"""

import importlib.util
import os

import ml_collections


def _deepeyes():
    """The configs/deepeyes.py module (loaded by path: configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_deepeyes_config",
                                                  os.path.join(os.path.dirname(__file__), "deepeyes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VARIANTS = ("conditional", "none", "unconditional")
SIZES = ("full", "ci")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    from deepeyes_jax.minivstar import tasks

    deepeyes = _deepeyes()
    a = deepeyes.parse_arg(arg, {"variant": VARIANTS, "size": SIZES},
                           {"variant": "conditional", "size": "full"})
    ci = a["size"] == "ci"
    c = ml_collections.ConfigDict()
    c.label = f"tool reward: {a['variant']}" + (" (ci)" if ci else "")
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.train_items = 32 if ci else 1024
    c.data.train_seed = 0
    c.data.eval_items = 8 if ci else 96
    c.data.eval_seed = 1  # held out: another generator seed

    c.model = ml_collections.ConfigDict()
    # Width 256 (8 heads of 32): width 128 x 4 learns the templates but not the in-context dependencies
    # (BENCHMARKS.md, Mini-V* third and fourth runs). A GRPO step costs 1.7x one at 128 x 4.
    c.model.hidden, c.model.layers = 256, 2
    c.model.vision_hidden, c.model.vision_depth = 64, 4

    c.format = ml_collections.ConfigDict()
    c.format.pretrain_steps = 3 if ci else 90
    c.format.pretrain_batch = 4 if ci else 32
    c.format.crop_first = 1 if ci else 50  # crop captions alone first (format_stage.FormatConfig)
    c.format.ground_first = 1 if ci else 40  # then grounding captions alone
    c.format.crop_as_observation = True  # crops shown as the zoom tool's observation
    # The zoom's reasoning names no card and restates nothing: the box alone says where the model looks,
    # and only grounding captions tie a frame word to a box (BENCHMARKS.md, Mini-V* seventh runs).
    c.format.restate = False  # first turns open with what the question asks about (tasks.think_restate)
    c.format.name_zoom = False  # zoom turns name the card they zoom into (tasks.think_zoom)
    # Half of the attribute zooms go into the asked card (the rest into a random scene card): a weak
    # prior, as a pretrained VLM's zooms beat chance. Without it GRPO never made the box depend on the
    # question (BENCHMARKS.md, Mini-V* seventh runs). 0.5 with zoom_prob 0.4 (below): about as many
    # aimed zooms per episode as 0.3 with 0.6 (0.20 against 0.18) and the asked card's tile the most
    # likely box on 0.78 of items instead of 0.41 (fifteenth runs).
    c.format.aim = 0.5
    c.format.ground_calls = 0.0  # share of protocol episodes asking where a card is (tasks.ground_call)
    c.format.kinds = (0.4, 0.4, 0.2, 0.0)  # crop, ground, full_view, read captions (one kind per step)
    # 250: from 150 to 200 the sampled calls stop failing (0.16 -> 0 at T=0.5) and the box prior doubles
    # (asked tile the most likely on 0.28 -> 0.56 of items; ninth runs); at 250 it is 0.75 (eleventh runs,
    # zoom 0.8 and aim 0.2; with this default, 0.41 or 0.84 by the seed: twelfth runs)
    c.format.steps = 2 if ci else 250
    c.format.refresh = 0.0 if ci else 0.35  # share of protocol-phase steps that are caption steps again
    c.format.batch = 4 if ci else 16
    c.format.micro_batches = 1
    # Padding: lengths to multiples of 64 and vision windows to multiples of 32 instead of powers of
    # two: the same steps at 0.6-0.85x the time (BENCHMARKS.md, Mini-V* eleventh runs)
    c.format.length_multiple = 64
    c.format.window_multiple = 32
    c.format.lr = 1e-3  # 2e-3 delays the crop dependency past 60 steps
    # 0.4: the format model does not know when to look. Greedy it never zooms, so it starts near chance
    # on zoom-needed items; sampled at T=0.5 it zooms on about a quarter of them and GRPO has to discover
    # zooming. At 0.6 the greedy choice was a coin flip of the fit: never zooming with seed 0, zooming on
    # every item with seed 1 and with a changed layout, which then started at 0.51-0.83 and could not
    # gain 30 points (BENCHMARKS.md, Mini-V* twelfth and fifteenth runs).
    c.format.zoom_prob = 0.4
    c.format.log_every = 1 if ci else 20
    c.format.probe_prompts = 2 if ci else 16  # sampled behaviour of the format model (run.py)
    c.format.probe_samples = 2 if ci else 4
    # teacher-forced diagnostics: format_stage.box_prior (the tool call's box) and full_view_reading
    # (answers without a zoom)
    c.format.prior_items = 2 if ci else 32

    c.eval = ml_collections.ConfigDict()
    c.eval.orders = ("shuffled",)
    c.eval.seed = 0
    c.eval.batch = 4 if ci else 32
    c.eval.media_max_side = 256
    c.eval.view_items = 48

    g = deepeyes.get_config("model=tiny")
    g.steps = 2 if ci else 20
    g.data.source = "minivstar"
    g.data.minivstar_items = c.data.train_items
    g.data.minivstar_seed = c.data.train_seed
    # 16 groups of 4 samples an update: with 4 x 8 the box's tile hops between steps to the last batch's
    # targets (BENCHMARKS.md, Mini-V* seventh runs). 32 prompts sampled (in two sampler calls, cheaper
    # than one) and an update on 16 groups, those whose rewards differ first (`optim.update_groups`,
    # DAPO's dynamic sampling): on the eleventh runs' format model the asked card ends boxed on 68 of 76
    # held-out items in all three runs (BENCHMARKS.md, tenth and eleventh runs). The CI size updates on 1
    # of its 2 groups, sampled in two calls.
    g.data.prompts_per_step = 2 if ci else 32
    g.optim.update_groups = 1 if ci else 16
    g.rollout.prompts_per_call = 1 if ci else 16
    g.rollout.num_samples = 2 if ci else 4
    g.rollout.max_turns = 3
    g.rollout.max_turn_tokens = 96
    g.rollout.max_response_tokens = 384
    g.rollout.max_prompt_tokens = 1024
    g.rollout.system_prompt = tasks.SYSTEM_PROMPT
    # 0.5, not the recipe's 1.0: at 1.0 the tiny format model's sampled calls fail 0.42 of the time and
    # GRPO unlearns zooming (BENCHMARKS.md, Mini-V* fifth runs); at 0.7 zooming died with 2 of 4 seeds
    # and format models, at 0.5 it stayed with all 3 seeds tried (eighth runs). On the fourteenth runs'
    # format model calls hold at 0.7 and 1.0 (fail 0.03 and 0.13), but neither gains over three GRPO seeds,
    # and at 1.0 one seed of three never learns to zoom (fourteenth runs). A deviation for the size.
    g.rollout.temperature = 0.5
    g.reward.tool_reward = a["variant"]
    # 1e-4: updates on 16 groups that all carry a signal broke the protocol at 2e-4 with one seed of two
    # (tenth runs)
    g.optim.lr = 1e-4
    g.optim.weight_decay = 0.0
    g.optim.micro_batches = 1 if ci else 2
    g.optim.remat = False
    # The same update, cheaper (BENCHMARKS.md, GRPO update on Mini-V* rollouts): the ratio's old
    # log-probs from the update's own forward pass (one optimiser step per batch), rows padded to
    # multiples of 64 tokens instead of powers of two, trajectories packed into rows.
    g.optim.old_logprobs = "current"
    g.optim.length_multiple = 64
    g.optim.window_multiple = 32  # a Mini-V* micro-batch needs ~300 windows: 320, not 512
    g.optim.pack = True
    g.metrics.trajectories_per_step = 2
    g.checkpoint.every = 1 if ci else 10
    g.checkpoint.keep = 2
    c.grpo = g
    return c
