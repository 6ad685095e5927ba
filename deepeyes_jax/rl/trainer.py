"""The GRPO training loop, sectioned in the order things happen: mesh, model and optimiser, checkpoint,
data, rewards, then per step: rollouts -> rewards -> advantages -> old log-probs -> update -> metrics
-> checkpoint.

Multi-host: every process runs this same loop on the same global batch of prompts; the jitted sampler
and update run SPMD over the global mesh, and the small per-row sampler outputs come back replicated, so
all hosts take identical decisions. Only process 0 writes metrics; all take part in checkpointing.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from deepeyes_jax.model import checkpoint as hf_checkpoint
from deepeyes_jax.model import sharding
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import checkpoint as ckpt_lib
from deepeyes_jax.rl import grpo, metrics, rewards, writers
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import Prompt, RolloutConfig, Sample, Sampler
from deepeyes_jax.utils import buckets


def rollout_config(c: ml_collections.ConfigDict) -> RolloutConfig:
    return RolloutConfig(max_turns=c.max_turns, max_turn_tokens=c.max_turn_tokens,
                         max_response_tokens=c.max_response_tokens, max_prompt_tokens=c.max_prompt_tokens,
                         pause_at_tool_call=c.pause_at_tool_call, tools=tuple(c.tools),
                         box_frame=c.box_frame, system_prompt=c.get("system_prompt") or None)


def update_config(c: ml_collections.ConfigDict) -> step_lib.UpdateConfig:
    fields = {f.name for f in dataclasses.fields(step_lib.UpdateConfig)}
    return step_lib.UpdateConfig(**{k: v for k, v in c.items() if k in fields})


def reward_setup(c: ml_collections.ConfigDict, workdir: str):
    """(RewardConfig, judge or None): judge "rule" scores every source without a server."""
    judges = {} if c.judge == "llm" else {s: "rule" for s in ("vstar", "chart", "hrbench")}
    if c.judge == "rule":
        judges["thinklite_eureka"] = "math"
    rcfg = rewards.RewardConfig(tool_reward=c.tool_reward, judges=judges)
    if c.judge != "llm":
        return rcfg, None
    if not c.judge_url:
        raise ValueError("reward.judge='llm' needs --config.reward.judge_url=http://host:port/v1")
    from deepeyes_jax.rl import llm_judge

    return rcfg, llm_judge.LLMJudge(llm_judge.LLMJudgeConfig(
        base_url=c.judge_url, model=c.judge_model, api_key_env=c.judge_api_key_env,
        failure_policy=c.judge_failure, cache_path=os.path.join(workdir, "judge_cache.jsonl")))


def make_data(c: ml_collections.ConfigDict, seed: int):
    """The prompt-group iterator (`next` -> G records; `get_state`/`set_state`) over the Grain pipeline:
    prepared ArrayRecord directories, the in-repo toy set (`source=toy`) or Mini-V*'s synthetic items
    (`source=minivstar`)."""
    import grain

    from deepeyes_jax.data import pipeline, toy

    if c.source == "toy":
        h, w = c.toy_image_size
        sources = [pipeline.Source(toy.toy_records(c.toy_records, seed=seed, height=h, width=w,
                                                   data_source="vstar"), name="toy")]
    elif c.source == "minivstar":  # Mini-V*'s synthetic training items (minivstar/tasks.py)
        from deepeyes_jax.minivstar import tasks

        sources = [pipeline.Source([t.record for t in tasks.make_tasks(c.minivstar_items, c.minivstar_seed)],
                                   name="minivstar")]
    else:
        paths = [p for p in c.paths.split(",") if p]
        if not paths:
            raise ValueError("config.data.paths is empty: pass prepared dataset directories "
                             "(launch/prepare_data.py), or use --config.data.source=toy")
        weights = [float(w) for w in c.weights.split(",") if w] or [1.0] * len(paths)
        if len(weights) != len(paths):
            raise ValueError(f"config.data.weights has {len(weights)} entries for {len(paths)} paths")
        sources = [pipeline.Source(p, w) for p, w in zip(paths, weights, strict=True)]
    # Every process reads the same global batch (the rollouts run SPMD over the global mesh).
    cfg = pipeline.PipelineConfig(batch_size=c.prompts_per_step, seed=seed, decode_images=False,
                                  worker_count=c.workers)
    return pipeline.make_iterator(sources, cfg, shard=grain.sharding.NoSharding())


def _judge_stats(judge) -> dict[str, float]:
    stats = getattr(judge, "stats", None)
    if stats is None:
        return {}
    values = stats.as_dict() if hasattr(stats, "as_dict") else dataclasses.asdict(stats)
    return {f"judge/{k}": float(v) for k, v in values.items()}


def _images(records):
    return [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in records]


def rollouts(sampler: Sampler, prompts: list[Prompt], n: int, method, rng: jax.Array, per_call: int):
    """`n` rollouts per prompt, prompt-major: one sampler call (`per_call` 0), or calls of `per_call`
    prompts, the k-th sampled with `fold_in(rng, k)`."""
    if per_call < 0:
        raise ValueError(f"rollout.prompts_per_call={per_call}; use 0 (one call) or a positive count")
    if not per_call or per_call >= len(prompts):
        return sampler(prompts, n, method, rng)
    return [t for k, i in enumerate(range(0, len(prompts), per_call))
            for t in sampler(prompts[i:i + per_call], n, method, jax.random.fold_in(rng, k))]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per `config`, writing everything under `workdir`; returns the last step's metrics."""
    os.makedirs(workdir, exist_ok=True)
    n = config.rollout.num_samples
    if not 0 <= config.optim.update_groups <= config.data.prompts_per_step:
        raise ValueError(f"optim.update_groups={config.optim.update_groups} with data.prompts_per_step="
                         f"{config.data.prompts_per_step}; use 0 (every group) or at most prompts_per_step")
    for name in ("length_multiple", "window_multiple"):
        buckets.check_multiple(config.optim[name], f"optim.{name}")

    # ---- mesh ---------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.get_rules(config.mesh.rules)

    # ---- model, optimiser and the compiled steps --------------------------------------------------
    pre = hf_checkpoint.load_pretrained(config.model.checkpoint, mesh=mesh, rules=rules,
                                        dtype=config.model.dtype)
    ucfg = update_config(config.optim)
    optimizer = step_lib.make_optimizer(pre.model, ucfg)
    graphdef, state = nnx.split((pre.model, optimizer))
    state_sh = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, state_sh)
    # KL = 0 (the recipe): no reference model at all. Otherwise a frozen copy of the initial weights
    # (copied: the update donates `state`).
    ref_state = jax.tree.map(jnp.copy, state) if ucfg.kl_coef > 0 else None

    # ---- checkpoint: resume if this workdir has one ---------------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    start, data_state = 0, None
    restored = ckpt.restore(ckpt_lib.abstract_like(state[0], state_sh[0]),
                            ckpt_lib.abstract_like(state[1], state_sh[1]))
    if restored is not None:
        start, params, opt_state, _, data_state = restored
        leaves = jax.tree.leaves(params) + jax.tree.leaves(opt_state)
        state = jax.tree.unflatten(jax.tree.structure(state), leaves)
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)

    # ---- data and rewards -------------------------------------------------------------------------
    data = make_data(config.data, config.seed)
    if data_state is not None:
        data.set_state(data_state)
    rcfg, judge = reward_setup(config.reward, workdir)
    writer = writers.MetricsWriter(workdir, process_index=jax.process_index(), resume_step=start + 1)
    preempt = ckpt_lib.Preemption()
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rollout_config(config.rollout))
    method = Sample(temperature=config.rollout.temperature, top_p=config.rollout.top_p)
    base_rng = jax.random.key(config.seed)
    programs: dict = {}  # compiled steps per batch structure (step_lib.steps_for)
    last: dict[str, float] = {}

    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            rng = jax.random.fold_in(base_rng, step)
            records = next(data)
            model, _ = nnx.merge(graphdef, state)
            sampler.model = model

            # rollouts (n per prompt, one shared prefill; in calls of `prompts_per_call` prompts)
            prompts = [Prompt(image=im, question=r["question"])
                       for im, r in zip(_images(records), records, strict=True)]
            with jax.set_mesh(mesh):
                trajs = rollouts(sampler, prompts, n, method, rng, config.rollout.prompts_per_call)
            t1 = time.perf_counter()

            # rewards and advantages
            recs = [r for r in records for _ in range(n)]
            # The scored text is the whole response with observations, special tokens kept; the tool
            # term counts crops that reached the context (as the reference counts image blocks).
            texts, ok_calls = zip(*(rewards.reward_inputs_from_trajectory(t, pre.tokenizer) for t in trajs),
                                  strict=True)
            outs = rewards.score_batch(recs, texts, ok_calls, judge, config=rcfg)
            reward = np.array([o.total for o in outs], np.float32)
            adv = grpo.advantages(config.advantage.estimator, reward, n, config.advantage.eps)
            t2 = time.perf_counter()

            # the groups to update on (all, or with `update_groups` those with a signal first), pack,
            # old log-probs, update
            sel = grpo.select_groups(reward, n, config.optim.update_groups)
            batch = batch_lib.pack([trajs[i] for i in sel], adv[sel], pre.config.vision,
                                   config.optim.micro_batches, length_multiple=config.optim.length_multiple,
                                   packed=config.optim.pack, window_multiple=config.optim.window_multiple)
            compiled = step_lib.steps_for(programs, graphdef, state, batch, mesh, rules, ucfg,
                                          with_ref=ref_state is not None)
            dev_batch = compiled.place(batch)
            if config.optim.old_logprobs == "recompute":
                dev_batch = dev_batch.replace(old_logprobs=compiled.logprobs(state, dev_batch))
            ref_logp = compiled.logprobs(ref_state, dev_batch) if ref_state is not None else None
            t3 = time.perf_counter()
            state, upd = compiled.update(state, dev_batch, ref_logp)
            upd = {k: float(v) for k, v in jax.device_get(upd).items()}
            t4 = time.perf_counter()
            if not np.isfinite(upd["update/loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {upd['update/loss']}")

            # metrics
            m = metrics.rollout_metrics(trajs, records, outs, n)
            m.update(upd)
            m.update(_judge_stats(judge))
            m["advantage/mean"], m["advantage/std"] = float(adv.mean()), float(adv.std())
            m["advantage/abs_max"] = float(np.abs(adv).max())
            m["groups/updated"] = len(sel) // n
            m["groups/updated_zero_std_frac"] = grpo.zero_std_fraction(reward[sel], n)
            m.update({"batch/length": float(batch.input_ids.shape[-1]),  # the shape buckets (programs)
                      "batch/rows": float(batch.input_ids.shape[0] * batch.input_ids.shape[1]),
                      "batch/vision_tokens": float(batch.vision.token_index.shape[-1]),
                      "batch/image_windows": float(batch.vision.image_windows)})
            tokens = sum(len(t.input_ids) for t in trajs)
            m.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/logprobs": t3 - t2,
                      "time/update": t4 - t3, "time/step": t4 - t0,
                      "throughput/tokens_per_s": tokens / (t4 - t0)})
            writer.write(step + 1, m)
            keep = config.metrics.trajectories_per_step
            writers.save_trajectories(workdir, step + 1, list(zip(trajs, recs, outs, strict=True))[:keep],
                                      process_index=jax.process_index())
            print(writers.format_progress(step + 1, m), flush=True)
            last = m

            # checkpoint
            done = step + 1 == config.steps
            if (step + 1) % config.checkpoint.every == 0 or done or preempt.requested:
                ckpt.save(step + 1, state[0], state[1], {"step": step + 1, "seed": config.seed},
                          data.get_state(), force=True)
                print(f"checkpoint saved step {step + 1}", flush=True)
            if preempt.requested:
                ckpt.wait()
                print(f"preempted: saved step {step + 1}, exiting", flush=True)
                break
    finally:
        if judge is not None:
            judge.close()
        ckpt.close()
        writer.close()
        preempt.restore()
    return last
