"""Rewards: the reference's V*/chart and ThinkLite formulas, format rules at their boundaries, tool-reward
modes, the data_source registry and the batch API."""

import types

import pytest

from conftest import fixture_path
from deepeyes_jax.processing import Tokenizer
from deepeyes_jax.rl import rewards
from deepeyes_jax.rl.judges import JudgeRequest
from deepeyes_jax.rl.rewards import RewardConfig, parse_response, score, score_batch
from deepeyes_jax.tools import ToolResult, observation_ids, observation_text

VSTAR = {"id": "v0", "data_source": "vstar", "question": "What color is the cup?", "answer": "red",
         "options": []}
MATH = {"id": "m0", "data_source": "thinklite_eureka", "question": "What is 1/2 + 1/4?", "answer": "3/4",
        "options": []}
CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 64, 64]}}</tool_call>'
CROP = observation_text(ToolResult(name="image_zoom_in_tool", call_text=CALL[11:-12], status="ok"))
ERROR = observation_text(ToolResult(name="x", call_text="{}", status="error", error="Unknown tool name: x"))
RULE = RewardConfig(judges={"vstar": "rule", "chart": "rule", "thinklite_eureka": "math"})


def response(answer: str = "red", crops: int = 0, final_think: bool = True) -> str:
    """A rollout's text: `crops` zoom turns with their observations, then the answer turn."""
    text = "".join(f"<think>zoom {i}</think>\n{CALL}{CROP}" for i in range(crops))
    return text + ("<think>done</think>\n" if final_think else "") + f"<answer>{answer}</answer><|im_end|>"


class StubJudge:
    """Answers from a table and records its calls."""

    def __init__(self, verdict: float = 1.0):
        self.verdict = verdict
        self.calls: list[list[JudgeRequest]] = []

    def judge_batch(self, requests):
        self.calls.append(list(requests))
        return [self.verdict] * len(requests)


def test_observation_text_holds_the_tags_the_rules_count():
    # The premise of the module docstring: crop observations repeat the user suffix's tags and hold the
    # image block that the vision rule counts; error observations hold neither.
    for tag in ("<think>", "</think>", "<answer>", "</answer>", *rewards.REFERENCE_VISION_MARKERS):
        assert CROP.count(tag) == 1
        assert tag not in ERROR


@pytest.mark.parametrize("acc, crops, broken, expected", [
    (1.0, 1, False, 2.0), (1.0, 2, True, 1.8), (1.0, 0, False, 0.8), (1.0, 0, True, 0.6),
    (0.0, 0, False, 0.0), (0.0, 3, False, 0.0), (0.0, 0, True, -0.2), (0.0, 1, True, -0.2)])
def test_vstar_formula_takes_every_reference_value(acc, crops, broken, expected):
    text = response(crops=crops)
    if broken:
        text = "<think>" + text  # unbalanced think
    out = score(VSTAR, text, crops, judge_result=acc)
    assert out.total == expected
    assert sum(out.components.values()) == pytest.approx(expected)
    assert (out.accuracy, out.format_error, out.answer_text) == (acc, broken, "red")


def test_vstar_totals_are_exact_formula_values():
    values = {score(VSTAR, ("<think>" if b else "") + response(crops=c), c, judge_result=a).total
              for a in (0.0, 1.0) for c in (0, 1) for b in (False, True)}
    assert values == {2.0, 1.8, 0.8, 0.6, 0.0, -0.2}


def test_format_rule_think_balance():
    assert parse_response(VSTAR, "<think>a</think><answer>x</answer>").format_errors == ()
    assert parse_response(VSTAR, "<think>a</think><think>b<answer>x</answer>").format_errors == ("think",)
    assert parse_response(VSTAR, "a</think><answer>x</answer>").format_errors == ("think",)
    # The whole text counts, observations included: a balanced crop turn keeps the balance.
    assert parse_response(VSTAR, response(crops=2)).format_errors == ()


def test_format_rule_vision_balance_counts_image_blocks():
    open_, close = rewards.REFERENCE_VISION_MARKERS
    ok = f"<think>a</think>{open_}{close}<answer>x</answer>"
    assert parse_response(VSTAR, ok).format_errors == ()
    assert parse_response(VSTAR, f"<think>a</think>{open_}<answer>x</answer>").format_errors == ("vision",)
    assert parse_response(VSTAR, f"<think>a</think>{close}<answer>x</answer>").format_errors == ("vision",)
    # A lone marker (the policy may sample one) is not an image block for the reference...
    lone = "<think>a</think><|vision_start|><answer>x</answer>"
    assert parse_response(VSTAR, lone).format_errors == ()
    # ...but counts with plain markers.
    plain = RewardConfig(vision_markers=("<|vision_start|>", "<|vision_end|>"))
    assert parse_response(VSTAR, lone, plain).format_errors == ("vision",)


def test_format_rule_answer_balance_only_after_last_think():
    assert parse_response(VSTAR, "<think>a</think><answer>x").format_errors == ("answer",)
    assert parse_response(VSTAR, "<think>a</think>x</answer>").format_errors == ("answer",)
    assert parse_response(VSTAR, "<think>a</think><answer>x</answer><answer>y</answer>").format_errors == ()
    # An unclosed <answer> before the last </think> is not checked (the reference's split).
    parsed = parse_response(VSTAR, "<answer>x<think>a</think>")
    assert parsed.format_errors == ()
    assert parsed.answer_text == "x<think>a</think>"
    # No </think> at all: the whole text is "after" it.
    assert parse_response(VSTAR, "<answer>x").format_errors == ("answer",)


def test_answer_text_is_after_the_last_answer_tag():
    assert parse_response(VSTAR, "<answer> a </answer> <answer> b </answer>").answer_text == "b"
    assert parse_response(VSTAR, "  no tags at all ").answer_text == "no tags at all"
    assert parse_response(VSTAR, "<answer>open end").answer_text == "open end"
    assert parse_response(VSTAR, "left</answer> right").answer_text == "left"


def test_final_turn_without_answer_reads_the_observation_suffix():
    # The reference's string rules on the whole response: the last <answer> is the suffix's "...".
    text = f"<think>a</think>{CALL}{CROP}<think>b</think> it is red<|im_end|>"
    parsed = parse_response(VSTAR, text)
    assert parsed.answer_text == "..."
    assert parsed.format_errors == ()
    text = f"<think>a</think>{CALL}{CROP}it is red<|im_end|>"  # last </think> is the suffix's
    assert parse_response(VSTAR, text).format_errors == ()


@pytest.mark.parametrize("length, too_long", [(999, False), (1000, True), (1500, True)])
def test_long_answer_scores_zero_and_a_format_error(length, too_long):
    judge = StubJudge(1.0)
    out = score(VSTAR, response(answer="r" * length, crops=1), 1, judge=judge)
    assert out.format_error is too_long
    assert out.total == (-0.2 if too_long else 2.0)
    assert len(judge.calls) == (0 if too_long else 1)  # a too-long answer is never sent to the judge
    assert score(VSTAR, response(answer="r" * length), 1, judge_result=1.0).accuracy == (not too_long)


@pytest.mark.parametrize("mode, expected", [
    # (acc, crops) -> total for: (1,1), (0,1), (1,0), (0,0)
    ("conditional", (2.0, 0.0, 0.8, 0.0)),
    ("unconditional", (1.2, 0.4, 0.8, 0.0)),
    ("none", (0.8, 0.0, 0.8, 0.0)),
])
def test_tool_reward_modes(mode, expected):
    config = RewardConfig(tool_reward=mode)
    got = tuple(score(VSTAR, response(crops=c), c, judge_result=a, config=config).total
                for a, c in ((1.0, 1), (0.0, 1), (1.0, 0), (0.0, 0)))
    assert got == expected
    assert score(VSTAR, "<think>" + response(crops=1), 1, judge_result=0.0, config=config).total == (
        round(expected[1] - 0.2, 12))


def test_tool_bonus_needs_accuracy_above_half():
    assert score(VSTAR, response(crops=1), 1, judge_result=0.5).components["tool"] == 0.0
    assert score(VSTAR, response(crops=1), 1, judge_result=0.75).components["tool"] == 1.2


def test_chart_and_hrbench_use_the_vstar_formula():
    chart = dict(VSTAR, data_source="chart")
    assert score(chart, response(crops=1), 1, judge_result=1.0).total == 2.0
    hr = {"id": "h0", "data_source": "hrbench", "question": "Q? A. cat B. dog", "answer": "B",
          "options": ["cat", "dog"]}
    assert score(hr, response(answer="(B) dog", crops=1), 1).total == 2.0  # default judge: choice
    assert score(hr, response(answer="cat"), 0).total == 0.0


@pytest.mark.parametrize("text, acc, broken, expected", [
    (r"<think>a</think> so \boxed{\frac{3}{4}}", 1.0, False, 1.2),
    (r"<think>a</think> \boxed{0.75}", 1.0, False, 1.2),
    (r"<think>a</think> \boxed{1/2}", 0.0, False, 0.0),
    (r"<think>a<think>b</think> \boxed{3/4}", 1.0, True, 0.8),
    (r"<think>a</think> \boxed{1} then \boxed{3/4}", 1.0, True, 0.8),  # several boxes: the last counts
    (r"<think>a</think> the answer is 3/4", 0.0, True, -0.4),  # no box
    (r"<think>\boxed{3/4}</think> 3/4", 0.0, True, -0.4),  # the box is before the last </think>
    (r"<think>a</think> \boxed{}", 0.0, True, -0.4),  # empty
])
def test_thinklite_formula_and_boxed_extraction(text, acc, broken, expected):
    out = score(MATH, text, 2, config=RULE)  # crops never earn a tool term here
    assert (out.total, out.accuracy, out.format_error) == (expected, acc, broken)
    assert out.components["tool"] == 0.0


def test_thinklite_math_then_llm_fallback():
    judge = StubJudge(1.0)
    texts = [r"<think>a</think>\boxed{0.75}", r"<think>a</think>\boxed{three quarters}", "<think>a</think>"]
    outs = score_batch([MATH] * 3, texts, [0, 0, 0], judge)
    assert [o.total for o in outs] == [1.2, 1.2, -0.4]
    # Only what math equivalence rejects goes to the LLM judge.
    assert [[r.response for r in call] for call in judge.calls] == [["three quarters"]]
    assert score(MATH, texts[1], 0, config=RULE).total == 0.0


def test_score_batch_sends_one_judge_call_for_all_items():
    judge = StubJudge(1.0)
    chart = dict(VSTAR, data_source="chart", question="How many bars?", answer="4")
    records = [VSTAR, chart, MATH, VSTAR]
    texts = [response(crops=1), response("4"), r"<think>a</think>\boxed{7}", response("r" * 2000)]
    outs = score_batch(records, texts, [1, 0, 0, 1], judge)
    assert len(judge.calls) == 1
    assert [(r.question, r.answer, r.response) for r in judge.calls[0]] == [
        (VSTAR["question"], "red", "red"), ("How many bars?", "4", "4"), (MATH["question"], "3/4", "7")]
    assert [o.total for o in outs] == [2.0, 0.8, 1.2, -0.2]


def test_score_batch_errors():
    with pytest.raises(ValueError, match=r"2 records, 1 texts and 2 tool counts"):
        score_batch([VSTAR, VSTAR], ["a"], [0, 0], StubJudge())
    with pytest.raises(ValueError, match=r"\['vstar'\] use an LLM judge but none was given"):
        score_batch([VSTAR], [response()], [0])
    with pytest.raises(ValueError, match=r"num_ok_tool_calls=-1"):
        score(VSTAR, response(), -1, judge_result=1.0)
    with pytest.raises(ValueError, match=r"accuracy 2.0 .* not in \[0, 1\]"):
        score(VSTAR, response(), 0, judge_result=2.0)
    with pytest.raises(ValueError, match=r"has no 'question'"):
        score({"data_source": "vstar", "answer": "x"}, response(), 0, judge_result=1.0)
    with pytest.raises(ValueError, match=r"has no 'data_source'"):
        score({"question": "q", "answer": "x"}, response(), 0, judge_result=1.0)
    with pytest.raises(TypeError, match=r"decoded str"):
        score(VSTAR, b"<answer>red</answer>", 0, judge_result=1.0)


def test_registry():
    assert rewards.registered_sources() == ["chart", "hrbench", "minivstar_border", "minivstar_free",
                                            "thinklite_eureka", "vstar"]
    with pytest.raises(ValueError, match=r"no reward registered for data_source 'geoguessr'; registered: "
                                         r"\['chart', 'hrbench', 'minivstar_border', 'minivstar_free', "
                                         r"'thinklite_eureka', 'vstar'\]"):
        score(dict(VSTAR, data_source="geoguessr"), response(), 0, judge_result=1.0)
    with pytest.raises(ValueError, match=r"already registered for data_source 'vstar'"):
        rewards.register_reward("vstar", rewards.AnswerTagReward())
    with pytest.raises(ValueError, match=r"default_judge='oracle'"):
        rewards.register_reward("new_source", rewards.AnswerTagReward("oracle"))
    rewards.register_reward("my_vqa", rewards.AnswerTagReward("exact"))
    try:
        assert score(dict(VSTAR, data_source="my_vqa"), response("Red."), 1).total == 2.0
    finally:
        del rewards._REGISTRY["my_vqa"]


def test_config_validation():
    with pytest.raises(ValueError, match=r"tool_reward='always'; choose one of"):
        RewardConfig(tool_reward="always")
    with pytest.raises(ValueError, match=r"judges\['vstar'\]='gpt'; choose one of"):
        RewardConfig(judges={"vstar": "gpt"})
    with pytest.raises(ValueError, match=r"vision_markers"):
        RewardConfig(vision_markers=("<|vision_start|>",))
    assert rewards.judge_name("vstar", RewardConfig()) == "llm"
    assert rewards.judge_name("vstar", RULE) == "rule"
    with pytest.raises(TypeError):
        RULE.judges["vstar"] = "llm"  # frozen


def test_reward_inputs_from_trajectory_decode_observations():
    tok = Tokenizer.from_file(fixture_path("tokenizer", "tokenizer.json"))
    obs, _ = observation_ids(ToolResult(name="image_zoom_in_tool", call_text="{}", status="ok"), tok, 3)
    ids = tok.encode(f"<think>look</think>\n{CALL}") + obs
    ids += tok.encode("<think>ok</think><answer>red</answer>") + [tok.special.im_end]
    traj = types.SimpleNamespace(response_ids=ids, images=["original", "crop"])
    text, crops = rewards.reward_inputs_from_trajectory(traj, tok)
    assert crops == 1
    assert text.count("<|image_pad|>") == 3 and text.endswith("</answer><|im_end|>")
    out = score(VSTAR, text, crops, config=RULE)
    assert (out.total, out.format_error, out.answer_text) == (2.0, False, "red")
    # A last-turn call whose crop never reached the context earns nothing.
    traj = types.SimpleNamespace(response_ids=tok.encode("<answer>red</answer>"), images=["original"])
    assert rewards.reward_inputs_from_trajectory(traj, tok)[1] == 0


def test_answer_tag_reward_without_tool_term():
    free = rewards.get_reward("minivstar_free")
    for mode in ("conditional", "unconditional", "none"):
        cfg = rewards.RewardConfig(tool_reward=mode)
        assert free.terms(1.0, False, 2, cfg) == {"accuracy": 0.8, "format": 0.0, "tool": 0.0}
    assert rewards.get_reward("vstar").terms(1.0, False, 2, rewards.RewardConfig())["tool"] == 1.2
