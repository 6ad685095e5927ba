"""Rewards of finished rollouts, chosen by the record's `data_source` (deepeyes.md §4).

    text, crops = reward_inputs_from_trajectory(traj, tokenizer)
    outs = score_batch(records, texts, crop_counts, judge=llm_judge, config=RewardConfig())
    outs[i].total, outs[i].components, outs[i].accuracy, outs[i].format_error, outs[i].answer_text

Registered sources (`register_reward` adds more; an unknown source is an error naming the known ones):

| data_source | formula | default judge |
|---|---|---|
| `vstar`, `chart` | `0.8*acc - 0.2*[format error] + 1.2*[acc and >= 1 crop]` | `llm` |
| `hrbench` | the same | `choice` |
| `thinklite_eureka` | `1.2*acc - 0.4*[format error]`, no tool term | `math+llm` |

What is scored. The reference (verl) decodes the WHOLE response, model turns and observations, keeping
special tokens, and applies string rules to it; this module does the same, so `response_text` must be
`tokenizer.decode(traj.response_ids, skip_special_tokens=False)`. Consequences kept from the reference:
the vision markers the format check counts occur only in observations (one pair per crop that reached
the context), and every crop observation repeats the user suffix, whose text holds one `<think>...</think>`,
`<tool_call>...</tool_call>` and `<answer>...</answer>` each. Those pairs are balanced, but when the
final turn has no `<answer>` the last `<answer>` is the suffix's, so the answer text is "..." (the
reference's behaviour, not a crash).

V*/chart/hrbench ("answer-tag" rules, the reference's `compute_score`). Format error when
`<think>` and `</think>` counts differ in the whole text; when the counts of `vision_markers` differ (the
reference counts `<|vision_start|><|image_pad|>` against `<|image_pad|><|vision_end|>`, i.e. image blocks;
a lone marker the policy writes does not count, set `vision_markers=("<|vision_start|>", "<|vision_end|>")`
to count those too); or when, after the last `</think>`, `<answer>` and `</answer>` counts differ. Answer
text: after the last `<answer>`, up to the next `</answer>`, stripped (the whole text when there is no
tag). An answer of `max_answer_chars` (1000) characters or more scores acc 0 and a format error (the
reference's guard against judge hacking); the judge is not asked.

Tool term (`RewardConfig.tool_reward`): "conditional" (the reference): `tool_weight` (1.2) when acc > 0.5
and at least one crop reached the context; "unconditional": `unconditional_tool_weight` whenever at
least one crop did, right or wrong. Its default 0.4 is the reference's first formula, `0.8*acc -
0.2*[format error] + 0.4*[crop]`, kept commented in its code as "reward 1"; the paper gives no weight for
its ablation, so this is our reading. "none": no tool term.

ThinkLite (the reference's `compute_score_math`): format error when `<think>`/`</think>` counts differ,
when there is no `\\boxed{}` after the last `</think>` (then acc 0) or more than one (the last counts).
No answer-tag, vision or length rule, as in the reference. Boxes are read with balanced braces (the
reference's regex cut `\\boxed{\\frac{1}{2}}` at the first `}`). The judge "math+llm" checks math
equivalence first and asks the LLM judge only when it fails, as the reference did with math_verify.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from deepeyes_jax.rl.judges import RULE_JUDGES, Judge, JudgeRequest, math_match
from deepeyes_jax.rl.math_equiv import extract_boxed

if TYPE_CHECKING:
    from deepeyes_jax.processing.chat import Tokenizer
    from deepeyes_jax.sampling.rollout import Trajectory

ToolRewardMode = Literal["conditional", "unconditional", "none"]
TOOL_REWARD_MODES = ("conditional", "unconditional", "none")
LLM_JUDGES = ("llm", "math+llm")
JUDGE_NAMES = (*LLM_JUDGES, *RULE_JUDGES)
REFERENCE_VISION_MARKERS = ("<|vision_start|><|image_pad|>", "<|image_pad|><|vision_end|>")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward weights and switches (defaults: the reference's).

    Attributes:
      tool_reward: "conditional" (default), "unconditional" or "none" (see the module docstring).
      acc_weight, format_penalty, tool_weight: V*/chart/hrbench weights (0.8, 0.2, 1.2).
      unconditional_tool_weight: the tool term in "unconditional" mode (0.4).
      math_acc_weight, math_format_penalty: ThinkLite weights (1.2, 0.4).
      max_answer_chars: answers this long or longer score acc 0 and a format error (answer-tag rules).
      vision_markers: the (open, close) strings whose counts must match.
      judges: data_source -> judge name, overriding the registered defaults. Names: "llm", "math+llm"
        (math equivalence, then the LLM judge for what it rejects), or a rule judge: "rule", "choice",
        "exact", "numeric", "math". E.g. {"vstar": "rule", "chart": "rule"} to train with no server.
    """

    tool_reward: ToolRewardMode = "conditional"
    acc_weight: float = 0.8
    format_penalty: float = 0.2
    tool_weight: float = 1.2
    unconditional_tool_weight: float = 0.4
    math_acc_weight: float = 1.2
    math_format_penalty: float = 0.4
    max_answer_chars: int = 1000
    vision_markers: tuple[str, str] = REFERENCE_VISION_MARKERS
    judges: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tool_reward not in TOOL_REWARD_MODES:
            raise ValueError(f"RewardConfig.tool_reward={self.tool_reward!r}; "
                             f"choose one of {TOOL_REWARD_MODES}")
        for source, name in self.judges.items():
            if name not in JUDGE_NAMES:
                raise ValueError(f"RewardConfig.judges[{source!r}]={name!r}; choose one of {JUDGE_NAMES}")
        if self.max_answer_chars < 1:
            raise ValueError(f"RewardConfig.max_answer_chars={self.max_answer_chars} must be >= 1")
        if len(self.vision_markers) != 2 or not all(self.vision_markers):
            raise ValueError(f"RewardConfig.vision_markers={self.vision_markers!r}; expected (open, close)")
        object.__setattr__(self, "judges", types.MappingProxyType(dict(self.judges)))


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """The reward of one response.

    Attributes:
      total: the reward (the sum of `components`).
      components: "accuracy", "format" and "tool" terms, weighted.
      accuracy: the judged accuracy in [0, 1] (0 when the answer was too long or missing).
      format_error: whether a format rule failed.
      answer_text: the extracted answer (`<answer>` body or last `\\boxed{}` body).
    """

    total: float
    components: dict[str, float]
    accuracy: float
    format_error: bool
    answer_text: str


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """A response read by its source's rules, before judging.

    Attributes:
      answer_text: the extracted answer.
      format_errors: the failed format rules by name (e.g. ("think", "answer")); () when none.
      request: what to judge; None when accuracy is decided without a judge (`accuracy` holds it).
      accuracy: the accuracy when `request` is None.
    """

    answer_text: str
    format_errors: tuple[str, ...]
    request: JudgeRequest | None
    accuracy: float = 0.0


class RewardFn(Protocol):
    """One data source's rules: how to read a response and how to combine the terms."""

    default_judge: str

    def parse(self, record: Mapping[str, Any], text: str, config: RewardConfig) -> ParsedResponse:
        """Extracts the answer and checks the format."""
        ...

    def terms(self, accuracy: float, format_error: bool, num_crops: int,
              config: RewardConfig) -> dict[str, float]:
        """The weighted "accuracy", "format" and "tool" terms."""
        ...


def _request(record: Mapping[str, Any], response: str) -> JudgeRequest:
    try:
        question, answer = str(record["question"]), str(record["answer"])
    except KeyError as e:
        raise ValueError(f"record {record.get('id', '?')!r} has no {e.args[0]!r}; rewards need "
                         f"'data_source', 'question' and 'answer' (deepeyes_jax/data/schema.py)") from None
    return JudgeRequest(question, answer, response, tuple(str(o) for o in record.get("options") or ()))


@dataclasses.dataclass(frozen=True)
class AnswerTagReward:
    """V*/chart rules: `<answer>` tags, format checks, the conditional tool bonus."""

    default_judge: str = "llm"
    tool_term: bool = True

    def parse(self, record: Mapping[str, Any], text: str, config: RewardConfig) -> ParsedResponse:
        errors = []
        if text.count("<think>") != text.count("</think>"):
            errors.append("think")
        if text.count(config.vision_markers[0]) != text.count(config.vision_markers[1]):
            errors.append("vision")
        after_think = text.split("</think>")[-1]
        if after_think.count("<answer>") != after_think.count("</answer>"):
            errors.append("answer")
        answer = text.split("<answer>")[-1].split("</answer>")[0].strip()
        if len(answer) >= config.max_answer_chars:
            return ParsedResponse(answer, (*errors, "answer_too_long"), None, 0.0)
        return ParsedResponse(answer, tuple(errors), _request(record, answer))

    def terms(self, accuracy: float, format_error: bool, num_crops: int,
              config: RewardConfig) -> dict[str, float]:
        tool = 0.0
        if not self.tool_term:
            pass
        elif config.tool_reward == "conditional" and accuracy > 0.5 and num_crops >= 1:
            tool = config.tool_weight
        elif config.tool_reward == "unconditional" and num_crops >= 1:
            tool = config.unconditional_tool_weight
        return {"accuracy": config.acc_weight * accuracy,
                "format": -config.format_penalty if format_error else 0.0, "tool": tool}


@dataclasses.dataclass(frozen=True)
class BoxedMathReward:
    """ThinkLite rules: the last `\\boxed{}` after the last `</think>`, no tool term."""

    default_judge: str = "math+llm"

    def parse(self, record: Mapping[str, Any], text: str, config: RewardConfig) -> ParsedResponse:
        errors = ["think"] if text.count("<think>") != text.count("</think>") else []
        boxes = extract_boxed(text.split("</think>")[-1])
        if not boxes:
            return ParsedResponse("", (*errors, "no_boxed"), None, 0.0)
        if len(boxes) > 1:
            errors.append("multiple_boxed")
        answer = boxes[-1].strip()
        return ParsedResponse(answer, tuple(errors), _request(record, answer))

    def terms(self, accuracy: float, format_error: bool, num_crops: int,
              config: RewardConfig) -> dict[str, float]:
        return {"accuracy": config.math_acc_weight * accuracy,
                "format": -config.math_format_penalty if format_error else 0.0, "tool": 0.0}


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(data_source: str, reward: RewardFn, *, replace: bool = False) -> None:
    """Registers the rules for `data_source` (an error if taken, unless `replace`)."""
    if data_source in _REGISTRY and not replace:
        raise ValueError(f"a reward is already registered for data_source {data_source!r}; "
                         f"pass replace=True to override it")
    if reward.default_judge not in JUDGE_NAMES:
        raise ValueError(f"default_judge={reward.default_judge!r}; choose one of {JUDGE_NAMES}")
    _REGISTRY[data_source] = reward


def registered_sources() -> list[str]:
    """The data sources with a reward, sorted."""
    return sorted(_REGISTRY)


def get_reward(data_source: str) -> RewardFn:
    """The rules of `data_source`; a ValueError naming the registered sources when there are none."""
    if data_source not in _REGISTRY:
        raise ValueError(f"no reward registered for data_source {data_source!r}; registered: "
                         f"{registered_sources()}. Add one with deepeyes_jax.rl.rewards.register_reward.")
    return _REGISTRY[data_source]


register_reward("vstar", AnswerTagReward("llm"))
register_reward("chart", AnswerTagReward("llm"))
register_reward("hrbench", AnswerTagReward("choice"))
register_reward("thinklite_eureka", BoxedMathReward("math+llm"))
# Mini-V*'s zoom-free items: the answer-tag rules without a tool term, as DeepEyes' non-V* share of the
# mixture (ThinkLite) has none; see deepeyes_jax/minivstar/tasks.py.
register_reward("minivstar_free", AnswerTagReward("choice", tool_term=False))
# its border items (the same rules; their own source, so training metrics show them apart)
register_reward("minivstar_border", AnswerTagReward("choice", tool_term=False))


def _source(record: Mapping[str, Any]) -> str:
    if "data_source" not in record:
        raise ValueError(f"record {record.get('id', '?')!r} has no 'data_source'; it selects the reward")
    return str(record["data_source"])


def judge_name(data_source: str, config: RewardConfig) -> str:
    """The judge `data_source` uses: the config's override, else the registered default."""
    return config.judges.get(data_source, get_reward(data_source).default_judge)


def parse_response(record: Mapping[str, Any], response_text: str,
                   config: RewardConfig = RewardConfig()) -> ParsedResponse:
    """Reads a response by its record's source rules (no judging)."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be the decoded str, got {type(response_text).__name__}")
    return get_reward(_source(record)).parse(record, response_text, config)


def _output(record: Mapping[str, Any], parsed: ParsedResponse, accuracy: float, num_crops: int,
            config: RewardConfig) -> RewardOutput:
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy {accuracy} of record {record.get('id', '?')!r} is not in [0, 1]")
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 0:
        raise ValueError(f"num_ok_tool_calls={num_crops!r} must be an int >= 0")
    format_error = bool(parsed.format_errors)
    terms = get_reward(_source(record)).terms(accuracy, format_error, num_crops, config)
    # Rounding makes 0.8 - 0.2 exactly 0.6, so rewards compare and log as the formula's values.
    return RewardOutput(round(sum(terms.values()), 12), terms, accuracy, format_error, parsed.answer_text)


def score(record: Mapping[str, Any], response_text: str, num_ok_tool_calls: int,
          judge_result: float | None = None, *, config: RewardConfig = RewardConfig(),
          judge: Judge | None = None) -> RewardOutput:
    """The reward of one response.

    Args:
      record: the item (`data_source`, `question`, `answer`, optional `options`).
      response_text: the whole response, observations included, special tokens kept (see the module
        docstring and `reward_inputs_from_trajectory`).
      num_ok_tool_calls: crops that reached the context.
      judge_result: the accuracy already judged for `parse_response(...).request`; None runs the
        source's judge. Ignored when the rules decide accuracy alone (answer too long, no box).
      config: weights and judges.
      judge: the LLM judge, needed when the source's judge is "llm" or "math+llm".

    Returns:
      The reward with its terms.
    """
    if judge_result is None:
        return score_batch([record], [response_text], [num_ok_tool_calls], judge, config=config)[0]
    parsed = parse_response(record, response_text, config)
    accuracy = parsed.accuracy if parsed.request is None else float(judge_result)
    return _output(record, parsed, accuracy, num_ok_tool_calls, config)


def score_batch(records: Sequence[Mapping[str, Any]], texts: Sequence[str], tool_counts: Sequence[int],
                judge: Judge | None = None, *, config: RewardConfig = RewardConfig()) -> list[RewardOutput]:
    """Rewards of a batch; every item the LLM judge must see goes to it in ONE `judge_batch` call.

    Args:
      records, texts, tool_counts: per item, as `score`'s record, response_text, num_ok_tool_calls.
      judge: the LLM judge (any `Judge`), needed when a source in the batch uses "llm" or "math+llm".
      config: weights and judges.

    Returns:
      One RewardOutput per item, in order.

    Raises:
      ValueError: lengths differ, a source is unknown, or an LLM judge is needed but not given.
    """
    if not len(records) == len(texts) == len(tool_counts):
        raise ValueError(f"score_batch got {len(records)} records, {len(texts)} texts and "
                         f"{len(tool_counts)} tool counts; expected equal lengths")
    names = [judge_name(_source(r), config) for r in records]
    if judge is None and (needy := sorted({_source(r) for r, n in zip(records, names, strict=True)
                                           if n in LLM_JUDGES})):
        raise ValueError(f"data sources {needy} use an LLM judge but none was given: pass "
                         f"judge=LLMJudge(...), or set RewardConfig(judges={{...: 'rule'}})")
    parsed = [parse_response(r, t, config) for r, t in zip(records, texts, strict=True)]
    accuracy = [p.accuracy for p in parsed]
    to_llm: list[int] = []
    for i, (p, name) in enumerate(zip(parsed, names, strict=True)):
        if p.request is None:
            continue
        if name == "llm" or (name == "math+llm" and not math_match(p.request.response, p.request.answer)):
            to_llm.append(i)
        elif name == "math+llm":
            accuracy[i] = 1.0
        else:
            accuracy[i] = RULE_JUDGES[name](p.request)
    if to_llm:
        verdicts = judge.judge_batch([parsed[i].request for i in to_llm])
        if len(verdicts) != len(to_llm):
            raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(to_llm)} requests")
        for i, v in zip(to_llm, verdicts, strict=True):
            accuracy[i] = float(v)
    return [_output(r, p, a, n, config)
            for r, p, a, n in zip(records, parsed, accuracy, tool_counts, strict=True)]


def reward_inputs_from_trajectory(traj: Trajectory, tokenizer: Tokenizer) -> tuple[str, int]:
    """(response text, crops in the context) of a rollout, as `score` takes them.

    The text is every response token, observations included, decoded keeping special tokens, as the
    reference's reward saw it. The count is the crops that reached the context (`len(traj.images) - 1`),
    which is what the reference counted (image blocks in the response). It can be one less than the
    tool calls with status "ok": a call in the last allowed turn, or whose observation would overflow
    the budget, runs but its crop is never shown.
    """
    text = tokenizer.decode([int(t) for t in traj.response_ids], skip_special_tokens=False)
    return text, max(len(traj.images) - 1, 0)
