"""DeepEyes GRPO training.

  .venv/bin/python launch/train.py --config=configs/deepeyes.py:model=tiny --workdir=/tmp/run
  .venv/bin/python launch/train.py --config=configs/deepeyes.py:model=7b,mesh=fsdp \
      --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.source=arrayrecord \
      --config.data.paths=/data/deepeyes47k --workdir=gs://bucket/run1
  ... --config.mesh.shape=1,-1,4 --config.mesh.rules=fsdp_tp   # swap the mesh from the command line

Presets: model=7b (the reference recipe: 256 prompts x 16 rollouts, lr 1e-6, KL 0), 3b, 32b, tiny (the
tiny random checkpoint in tests/fixtures, toy data, CPU-sized budgets). mesh=fsdp | fsdp_tp | data.
Rerunning the same command resumes from the last checkpoint in --workdir.
"""

import ml_collections

MODELS = {
    "7b": dict(checkpoint="", prompts=256, samples=16, micro_batches=256),
    "3b": dict(checkpoint="", prompts=256, samples=16, micro_batches=128),
    "32b": dict(checkpoint="", prompts=256, samples=16, micro_batches=512),
    "tiny": dict(checkpoint="tests/fixtures/ckpt_tied", prompts=2, samples=4, micro_batches=2),
}
MESHES = {"fsdp": ((1, -1, 1), "fsdp"), "fsdp_tp": ((1, -1, 4), "fsdp_tp"), "data": ((-1, 1, 1), "data")}


def parse_arg(arg: str, choices: dict[str, tuple[str, ...]], defaults: dict[str, str]) -> dict[str, str]:
    """The `key=value,...` suffix of `--config=FILE:ARG`, each key one of `choices` (values checked)."""
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in choices:
            use = " and ".join(f"{k}=..." for k in choices)
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; use {use}")
        out[key] = value
    for key, allowed in choices.items():
        if out[key] not in allowed:
            raise ValueError(f"{key}={out[key]!r}; choose one of {list(allowed)}")
    return out


def get_config(arg: str = "model=tiny") -> ml_collections.ConfigDict:
    a = parse_arg(arg, {"model": tuple(sorted(MODELS)), "mesh": tuple(sorted(MESHES))},
                  {"model": "tiny", "mesh": "fsdp"})
    preset, tiny = MODELS[a["model"]], a["model"] == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 4 if tiny else 80

    c.model = ml_collections.ConfigDict()
    c.model.preset = a["model"]
    c.model.checkpoint = preset["checkpoint"]  # Hugging Face directory with the initial weights
    c.model.dtype = "float32" if tiny else "bfloat16"  # compute dtype; parameters stay float32

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape, c.mesh.rules = MESHES[a["mesh"]]

    c.data = ml_collections.ConfigDict()
    c.data.source = "toy" if tiny else "arrayrecord"  # toy: the in-repo toy set
    c.data.paths = ""  # comma-separated prepared ArrayRecord directories
    c.data.weights = ""  # comma-separated mixture weights, one per path (empty: proportional)
    c.data.prompts_per_step = preset["prompts"]
    c.data.workers = 0 if tiny else 8
    c.data.toy_image_size = (140, 196)  # source=toy: (height, width) of its images
    c.data.toy_records = 64

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_samples = preset["samples"]  # GRPO group size
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_turns = 5
    c.rollout.max_turn_tokens = 32 if tiny else 10240
    c.rollout.max_response_tokens = 256 if tiny else 20480
    c.rollout.max_prompt_tokens = 8192
    c.rollout.pause_at_tool_call = True
    c.rollout.tools = ("zoom",)
    c.rollout.box_frame = "resized"
    # Prompts per sampler call (0: all of the step's prompts in one call, the k-th call sampled with
    # fold_in(key, k)). Decode runs until a call's last row stops and reads the whole KV cache each step:
    # on CPU, Mini-V*'s 32 prompts x 4 take 7.2 s in two calls and 9.8 s in one (BENCHMARKS.md, Mini-V*
    # rollouts per step).
    c.rollout.prompts_per_call = 0

    c.reward = ml_collections.ConfigDict()
    c.reward.tool_reward = "conditional"  # conditional | unconditional | none
    c.reward.judge = "rule"  # rule | llm
    c.reward.judge_url = ""  # OpenAI-compatible server for judge=llm
    c.reward.judge_model = "Qwen2.5-72B-Instruct"
    c.reward.judge_api_key_env = "JUDGE_API_KEY"
    c.reward.judge_failure = "fallback_rule"  # fallback_rule | zero | raise

    c.advantage = ml_collections.ConfigDict()
    c.advantage.estimator = "grpo"  # grpo | mean_only
    c.advantage.eps = 1e-6

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5 if tiny else 1e-6
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.clip_low = 0.2
    c.optim.clip_high = 0.2
    c.optim.dual_clip = 3.0
    c.optim.entropy_coef = 0.0
    c.optim.kl_coef = 0.0  # 0: no reference model is built
    c.optim.loss_agg = "token_mean"  # token_mean | micro_batch_mean
    c.optim.micro_batches = preset["micro_batches"]
    c.optim.remat = True
    c.optim.freeze_vision = False
    c.optim.old_logprobs = "recompute"  # recompute | sampler | current (step.UpdateConfig)
    c.optim.length_multiple = 0  # 0: sequence lengths padded to powers of two; N: to multiples of N
    c.optim.window_multiple = 0  # 0: vision windows (of 64 patches) padded to powers of two; N: multiples
    # 0: update on every sampled group. K: on K of them, those whose rewards differ first (sample more
    # prompts than K, as DAPO's dynamic sampling; grpo.select_groups)
    c.optim.update_groups = 0
    c.optim.pack = False  # several trajectories per row (rl/batch.pack): the same loss, less padding

    c.metrics = ml_collections.ConfigDict()
    c.metrics.trajectories_per_step = 4

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1 if tiny else 5
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c
