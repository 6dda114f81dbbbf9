"""Rewards computed by code (alignment/rewards/): the shipped functions on hand-written completions, the
weighted sum and None against hand-worked numbers, the params, and the safety of calling user code (a
function that raises, hangs or returns a string: the error names the function and the row, or the row
is skipped and counted)."""

from __future__ import annotations

import math
import pickle
import threading
import time

import pytest

from alignment.config import CodeRewardConfig, ConfigError, parse_section
from alignment.data.prompts import PromptRow
from alignment.models.generation import prompt_seed
from alignment.rewards.combine import RewardBatch, mean_std, reward_metrics, weighted_sum
from alignment.rewards.functions import answer_format, exact_match, final_answer, length_penalty
from alignment.rewards.source import RewardFunctionError, RewardSource, call_with_timeout, load_function
from flows.config import parse

HERE = "tests.unit.test_rewards"


# --------------------------------------------------------------------------------- shipped functions
def test_exact_match_on_right_wrong_malformed_and_missing_tags():
    completions = [
        " 7 + 7 = 14. <answer>14</answer>",  # right
        " <answer>14.0</answer>",  # right, as a number
        " 7 + 8 = 15. <answer>15</answer>",  # wrong
        " <answer>fourteen</answer>",  # malformed: not a number
        " <answer>14",  # malformed: never closed
        " the answer is 14",  # no tag
        " <answer>3</answer> no, <answer>14</answer>",  # the last tag counts
        " <answer>1,200</answer>",  # thousands separator
    ]
    answers = ["14"] * 7 + ["1200"]
    assert exact_match(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_exact_match_is_none_where_a_row_has_no_reference():
    assert exact_match(["<answer>3</answer>"] * 3, answer=["3", None, "n/a"]) == [1.0, None, None]
    assert exact_match(["<answer>3</answer>"]) == [None]  # no `answer` column at all


def test_answer_format():
    completions = {
        " 3 + 4 = 7. <answer>7</answer>": 1.0,
        "<answer> 7 </answer>\n": 1.0,
        "<answer>7</answer> and more": 0.0,  # text after the tag
        "<answer>seven</answer>": 0.0,  # not a number
        "<answer>7": 0.0,  # unclosed
        "7": 0.0,  # missing
        "<answer>7</answer><answer>7</answer>": 0.0,  # twice
    }
    assert answer_format(list(completions)) == list(completions.values())
    assert final_answer("a <answer> 5 </answer>") == "5" and final_answer("5") is None


def test_length_penalty_is_dapo_soft_overlong_punishment():
    ids = [[0] * n for n in (20, 32, 40, 48, 50)]
    assert length_penalty(ids, max_tokens=48, cache_tokens=16) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_tokens"):
        length_penalty(ids, max_tokens=8, cache_tokens=16)


# ------------------------------------------------------------------------------------- combination
def test_weighted_sum_leaves_none_out():
    """{a: [1, None, 0], b: [0.5, 0.5, None]}, weights {a: 1, b: -2}: [1 - 1, 0 - 1, 0 + 0]."""
    values = {"a": [1.0, None, 0.0], "b": [0.5, 0.5, None]}
    assert weighted_sum(values, {"a": 1.0, "b": -2.0}) == [0.0, -1.0, 0.0]
    assert weighted_sum({"a": [None]}, {"a": 3.0}) == [0.0]  # skipped by every function: 0, as TRL
    with pytest.raises(ValueError, match="different numbers"):
        weighted_sum({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})


def test_mean_and_std_leave_none_out():
    """[1, None, 0, 0, 1]: mean 0.5, std sqrt(4 x 0.25 / 3) = 0.57735 (Bessel, as TRL's nanstd)."""
    mean, std = mean_std([1.0, None, 0.0, 0.0, 1.0])
    assert mean == 0.5 and std == pytest.approx(math.sqrt(1 / 3))
    assert mean_std([2.0, None])[0] == 2.0 and math.isnan(mean_std([2.0])[1])
    assert all(math.isnan(x) for x in mean_std([None, None]))


def test_reward_metrics_per_function_with_skips():
    batch = RewardBatch(
        totals=[1.0, 0.0, 2.0],
        values={"acc": [1.0, None, 1.0], "fmt": [0.0, 0.0, 1.0]},
        skipped={"acc": [False, True, False], "fmt": [False, False, False]},
    )
    metrics = reward_metrics(batch.rows())
    assert metrics == pytest.approx(
        {
            "rewards/acc/mean": 1.0,
            "rewards/acc/std": 0.0,
            "rewards/acc/skipped": 1.0,
            "rewards/fmt/mean": 1 / 3,
            "rewards/fmt/std": math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2),
            "rewards/fmt/skipped": 0.0,
        }
    )
    assert reward_metrics([{}, {}]) == {}  # a reward model alone: nothing per function


# ------------------------------------------------------------------------------------------- params
def rewards_cfg(*functions, **options) -> CodeRewardConfig:
    return parse_section(CodeRewardConfig, "grpo.rewards", {"functions": list(functions), **options})


def test_params_name_check_and_never_import():
    cfg = rewards_cfg(
        {"function": "exact_match"}, {"function": "my.module:fn", "weight": -0.5, "name": "fmt"}
    )
    assert [f.label for f in cfg.functions] == ["exact_match", "fmt"]
    with pytest.raises(ConfigError, match="distinct names"):
        rewards_cfg({"function": "a:exact_match"}, {"function": "b:exact_match"})
    with pytest.raises(ConfigError, match="functions.0.function"):
        rewards_cfg({"function": "os.system('x')"})
    with pytest.raises(ConfigError, match="a judge's"):
        rewards_cfg({"function": "my.module:fn", "name": "code"})
    # a stage: reward code goes with rewards, and the RM term with a reward model
    grpo = parse(
        "grpo", {"reward": "code", "reward_model": None, "rewards": {"functions": [{"function": "x:y"}]}}
    )
    assert grpo.rewards.functions[0].function == "x:y"
    with pytest.raises(ConfigError, match="reward: code goes with"):
        parse("grpo", {"reward": "code"})
    with pytest.raises(ConfigError, match="reward_model is null"):
        parse(
            "grpo", {"reward": "code", "reward_model": None, "rewards": {"functions": [{"function": "rm"}]}}
        )
    with pytest.raises(ConfigError, match="reward_model is null"):
        parse("grpo", {"reward_model": None})
    with pytest.raises(ConfigError, match="guard.held_out: no held-out judge 'gold'"):
        parse(
            "rest",
            {
                "reward": "code",
                "reward_model": None,
                "source": "arith",
                "rewards": {"functions": [{"function": "a:b"}]},
            },
        )


# ---------------------------------------------------------------------------------- the source
def test_source_sums_shipped_functions_with_the_rows_columns():
    cfg = rewards_cfg(
        {"function": "alignment.rewards.functions:exact_match"},
        {"function": "answer_format", "weight": 0.5},
        {"function": "length_penalty", "weight": 2.0, "kwargs": {"max_tokens": 4, "cache_tokens": 2}},
    )
    source = RewardSource.from_config(cfg)
    prompts = [PromptRow("2 + 2?", {"answer": "4"}), PromptRow("3 + 3?", {"answer": "6"}), PromptRow("?", {})]
    completions = ["<answer>4</answer>", "6 <answer>5</answer> so", "<answer>1</answer>"]
    ids = [[1, 2], [1, 2, 3], [1, 2, 3, 4, 5]]
    batch = source.score(prompts, completions, ids, [True] * 3)
    assert batch.values == {
        "exact_match": [1.0, 0.0, None],
        "answer_format": [1.0, 0.0, 1.0],
        "length_penalty": [0.0, -0.5, -1.0],
    }
    # 1 + 0.5 x 1 + 2 x 0; 0 + 0 + 2 x -0.5; (None) + 0.5 x 1 + 2 x -1
    assert batch.totals == [1.5, -1.0, -1.5]


def raises_on_seven(completions, **kwargs):
    return [1 / 0 if "7" in c else 1.0 for c in completions]


def hangs_on_seven(completions, **kwargs):
    if any("7" in c for c in completions):
        time.sleep(30)
    return [1.0] * len(completions)


def spins_on_seven(completions, **kwargs):
    while any("7" in c for c in completions):
        try:
            pass
        except Exception:  # a function that swallows every exception still stops at its deadline
            pass
    return [1.0] * len(completions)


def string_on_seven(completions, **kwargs):
    return ["1" if "7" in c else 0.0 for c in completions]


def too_few(completions, **kwargs):
    return [1.0]


def nan_always(completions, **kwargs):
    return [float("nan")] * len(completions)


def no_kwargs(completions):
    return [0.0] * len(completions)


def bad_source(name: str, on_error: str = "raise", timeout: float = 0.5) -> RewardSource:
    cfg = rewards_cfg({"function": f"{HERE}:{name}"}, on_error=on_error, timeout_seconds=timeout)
    return RewardSource.from_config(cfg)


BATCH = (
    [PromptRow(f"q{i}", {"id": f"arith-{i:05d}"}) for i in range(4)],
    ["1", "2", "7", "3"],
    [[1], [2], [7], [3]],
    [True] * 4,
)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("raises_on_seven", "raised ZeroDivisionError"),
        ("hangs_on_seven", "no answer within 0.5 s"),
        ("spins_on_seven", "no answer within 0.5 s"),
        ("string_on_seven", "returned '1' (str), not a finite number"),
    ],
)
def test_a_failing_function_stops_the_stage_naming_function_and_row(name, problem):
    started = time.perf_counter()
    with pytest.raises(RewardFunctionError) as error:
        bad_source(name).score(*BATCH)
    message = str(error.value)
    assert f"reward function {name!r} ({HERE}:{name})" in message
    assert "row 2 of the batch (id 'arith-00002'" in message and problem in message, message
    assert time.perf_counter() - started < 5  # two deadlines at most: the batch's, then row 2's


@pytest.mark.parametrize("name", ["raises_on_seven", "hangs_on_seven", "string_on_seven"])
def test_a_failing_row_is_skipped_and_counted_when_asked(name, caplog):
    batch = bad_source(name, on_error="skip").score(*BATCH)
    assert batch.values[name] == [1.0, 1.0, None, 1.0] if name != "string_on_seven" else [0.0, 0.0, None, 0.0]
    assert batch.skipped[name] == [False, False, True, False]
    assert reward_metrics(batch.rows())[f"rewards/{name}/skipped"] == 1.0
    assert "1 of 4 rows skipped" in caplog.text


def test_wrong_length_and_non_finite_values_are_errors():
    with pytest.raises(
        RewardFunctionError, match=r"'too_few' \(tests.unit.test_rewards:too_few\) returned 1 values for 4"
    ):
        bad_source("too_few").score(*BATCH)
    with pytest.raises(RewardFunctionError, match=r"returned nan \(float\), not a finite number"):
        bad_source("nan_always").score(*BATCH)


def test_a_function_must_be_importable_and_take_kwargs():
    with pytest.raises(RewardFunctionError, match="cannot import 'no_such_module'"):
        load_function("no_such_module:fn")
    with pytest.raises(RewardFunctionError, match="has no function 'nope'"):
        load_function(f"{HERE}:nope")
    with pytest.raises(RewardFunctionError, match=r"must accept \*\*kwargs"):
        load_function(f"{HERE}:no_kwargs")
    assert load_function("exact_match") is exact_match  # a bare name: a shipped function


def test_a_column_may_not_shadow_the_arguments():
    source = RewardSource.from_config(rewards_cfg({"function": "exact_match"}))
    with pytest.raises(RewardFunctionError, match="columns \\['completions'\\] clash"):
        source.score([PromptRow("q", {"completions": 1})], ["a"], [[1]], [True])


def test_the_deadline_holds_off_the_main_thread():
    outcome = {}

    def worker():
        try:
            call_with_timeout(lambda: time.sleep(5), 0.2)
        except BaseException as error:  # RewardTimeout is a BaseException
            outcome["error"] = type(error).__name__

    thread = threading.Thread(target=worker)
    started = time.perf_counter()
    thread.start()
    thread.join()
    assert outcome["error"] == "RewardTimeout" and time.perf_counter() - started < 2
    assert call_with_timeout(lambda: 3, 1.0) == 3


def test_judges_score_text_per_function_and_in_sum():
    cfg = rewards_cfg({"function": "exact_match"}, {"function": "answer_format", "weight": 0.5})
    judges = RewardSource.from_config(cfg).judges(tokenizer=None)
    prompts = [PromptRow("q", {"answer": "4"}), PromptRow("q2", {})]
    responses, finished = ["<answer>4</answer>", "<answer>4</answer> x"], [True, True]

    class Tokenizer:  # the judges re-tokenize the text; these functions ignore the ids
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [1] * len(text)})()

    judges = RewardSource.from_config(cfg).judges(Tokenizer())
    assert list(judges) == ["exact_match", "answer_format", "code"]
    exact = judges["exact_match"](prompts, responses, finished)
    assert exact[0] == 1.0 and math.isnan(exact[1])  # None: left out of the held-out mean
    assert judges["code"](prompts, responses, finished) == [1.5, 0.0]


# ------------------------------------------------------------------------------------------ prompts
def test_a_prompt_row_is_its_text_everywhere_and_keeps_its_columns():
    row = PromptRow("Question: 2 + 2?", {"answer": "4"})
    assert row == "Question: 2 + 2?" and hash(row) == hash("Question: 2 + 2?")
    assert prompt_seed(0, row, 1) == prompt_seed(0, "Question: 2 + 2?", 1)
    again = pickle.loads(pickle.dumps(row))  # gathered across processes with its columns
    assert isinstance(again, PromptRow) and again.columns == {"answer": "4"}


def test_a_bad_function_path_stops_the_stage_before_any_compute(tmp_path, monkeypatch, capsys):
    """`python -m alignment grpo` with a reward function that does not import: exit 2 and one line naming
    it, before any data or model is read (there is none here)."""
    from alignment.__main__ import main
    from tests.conftest import write_params

    monkeypatch.chdir(tmp_path)
    rewards = {"functions": [{"function": "no_such_module.rewards:score"}]}
    write_params(
        tmp_path / "params.yaml", {"grpo": {"reward": "code", "reward_model": None, "rewards": rewards}}
    )
    assert main(["grpo", "--no-tracking"]) == 2
    error = capsys.readouterr().err
    assert (
        "error: reward function 'no_such_module.rewards:score': cannot import 'no_such_module.rewards'"
        in error
    )
