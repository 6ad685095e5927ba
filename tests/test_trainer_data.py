"""The trainer's data: prepared ArrayRecord directories and the toy set through the Grain pipeline."""

import ml_collections
import pytest

from deepeyes_jax.data import storage, toy
from deepeyes_jax.rl import trainer


def data_config(**kw):
    c = ml_collections.ConfigDict(dict(source="arrayrecord", paths="", weights="", prompts_per_step=3,
                                       workers=0, toy_image_size=(84, 112), toy_records=16))
    c.update(kw)
    return c


def test_prepared_directories_mixture_and_state(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    storage.write_records(a, toy.toy_records(8, seed=1, data_source="vstar"))
    storage.write_records(b, toy.toy_records(8, seed=2, data_source="chart"))
    it = trainer.make_data(data_config(paths=f"{a},{b}", weights="1,1"), seed=0)
    first = next(it)
    assert len(first) == 3 and all(isinstance(r["image"], bytes) for r in first)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = trainer.make_data(data_config(paths=f"{a},{b}", weights="1,1"), seed=0)
    again.set_state(state)
    ids = lambda groups: [[r["id"] for r in g] for g in groups]
    assert ids([next(again) for _ in range(3)]) == ids(want)
    sources = {r["data_source"] for g in want for r in g}
    assert sources == {"vstar", "chart"}


def test_toy_source_and_errors():
    it = trainer.make_data(data_config(source="toy"), seed=0)
    assert {r["data_source"] for r in next(it)} == {"vstar"}
    with pytest.raises(ValueError, match="config.data.paths is empty"):
        trainer.make_data(data_config(), seed=0)
    with pytest.raises(ValueError, match="has 1 entries for 2 paths"):
        trainer.make_data(data_config(paths="x,y", weights="1"), seed=0)


def _deepeyes_config():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "deepeyes.py"
    spec = importlib.util.spec_from_file_location("deepeyes_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("model=tiny")


@pytest.mark.parametrize("setting, value, message", [
    ("update_groups", "over", "optim.update_groups={v} with data.prompts_per_step={p}"),
    ("length_multiple", -64, "optim.length_multiple=-64; use 0"),
    ("window_multiple", -32, "optim.window_multiple=-32; use 0"),
])
def test_bad_update_settings_are_refused_before_anything_runs(tmp_path, setting, value, message):
    config = _deepeyes_config()
    config.model.checkpoint = str(tmp_path / "never_read")
    p = config.data.prompts_per_step
    config.optim[setting] = p + 1 if value == "over" else value
    with pytest.raises(ValueError, match=message.format(v=p + 1, p=p)):
        trainer.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rollouts_in_calls_of_prompts_per_call_keep_prompt_major_order():
    import jax
    import numpy as np

    calls = []

    def sampler(prompts, n, method, rng):  # records each call; one "trajectory" per (prompt, sample)
        calls.append((list(prompts), np.asarray(jax.random.key_data(rng)).tolist()))
        return [(p, s) for p in prompts for s in range(n)]

    rng = jax.random.key(3)
    key = lambda k: np.asarray(jax.random.key_data(k)).tolist()
    prompts = ["a", "b", "c", "d", "e"]
    assert trainer.rollouts(sampler, prompts, 2, None, rng, 0) == [(p, s) for p in prompts for s in range(2)]
    assert calls == [(prompts, key(rng))]  # one call, the step's key itself
    calls.clear()
    out = trainer.rollouts(sampler, prompts, 2, None, rng, 2)
    assert out == [(p, s) for p in prompts for s in range(2)]
    assert calls == [(["a", "b"], key(jax.random.fold_in(rng, 0))),
                     (["c", "d"], key(jax.random.fold_in(rng, 1))),
                     (["e"], key(jax.random.fold_in(rng, 2)))]
    with pytest.raises(ValueError, match=r"rollout.prompts_per_call=-1; use 0 \(one call\)"):
        trainer.rollouts(sampler, prompts, 2, None, rng, -1)
