"""The embedded arithmetic task: generated problems whose worked answers are right and pass the shipped
rewards, prepared with their `answer` column kept for a reward computed by code, and the profile's
smoke (SFT -> GRPO on those rewards) through one real `dvc repro`, reporting held-out accuracy."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from ruamel.yaml import YAML

from alignment.config import ConfigError, PrepareConfig, parse_section
from alignment.data.arithmetic import generate
from alignment.data.prompts import PromptRow, load_prompts
from alignment.data.sources import prepare
from alignment.paths import Paths
from alignment.rewards.functions import answer_format, exact_match
from alignment.stages import prepare as prepare_stage
from tests.conftest import MICRO_PARAMS, ROOT, copy_project
from tests.integration.launching import fork, launch, max_abs_difference, weights

SMOKE = "configs/arithmetic-smoke"
STEP = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)\.")


def test_problems_are_seeded_distinct_and_worked_right():
    rows = generate(300, seed=3, max_number=10, steps=2)
    assert rows == generate(300, seed=3, max_number=10, steps=2)
    assert rows != generate(300, seed=4, max_number=10, steps=2)
    assert len({r["prompt"] for r in rows}) == 300 and rows[7]["id"] == "arith-00007"
    for row in rows:
        steps = STEP.findall(row["response"])
        assert len(steps) == 2, row
        for a, op, b, c in steps:  # every step of the worked answer is right arithmetic
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), row
        assert steps[-1][3] == row["answer"] and "<answer>number</answer>" in row["prompt"]
    responses, answers = [r["response"] for r in rows], [r["answer"] for r in rows]
    assert exact_match(responses, answer=answers) == [1.0] * 300  # the SFT answers are what the reward wants
    assert answer_format(responses) == [1.0] * 300


def test_some_demonstrations_ignore_the_format_when_asked():
    rows = generate(400, seed=0, max_number=10, steps=2, tagged_fraction=0.5)
    tagged = answer_format([r["response"] for r in rows])
    assert 150 < sum(tagged) < 250  # about half close with the tag
    for row, ok in zip(rows, tagged):
        assert ok or row["response"].endswith(f" The answer is {row['answer']}.")
    # the right number without the asked tag does not count as an answer
    assert exact_match([r["response"] for r in rows], answer=[r["answer"] for r in rows]) == tagged


def test_prepare_keeps_the_answer_for_the_reward(tmp_path):
    cfg = parse_section(
        PrepareConfig,
        "prepare",
        {
            "sources": [{"name": "arith", "kind": "arithmetic", "arithmetic": {"problems": 50}}],
            "test_fraction": 0.2,
        },
    )
    splits, report = prepare(cfg)
    assert report["sources"]["arith"] == {"read": 50, "kept": 50, "dropped": {}}
    row = splits["sft"]["train"][0]
    assert set(row) == {"prompt", "response", "source", "id", "answer"}
    assert set(splits["prompts"]["test"][0]) == {"prompt", "source", "id", "answer"}
    assert sum(len(rows) for rows in splits["prompts"].values()) == 50

    prepare_stage.run(cfg, Paths(tmp_path), None)
    prompts = load_prompts(Paths(tmp_path), "test", "arith", 100, tokenizer=None)
    assert isinstance(prompts[0], PromptRow) and set(prompts[0].columns) == {"id", "answer"}


def test_only_the_generated_kind_has_no_path():
    with pytest.raises(ConfigError, match="every other kind needs a path"):
        parse_section(PrepareConfig, "prepare", {"sources": [{"name": "a", "kind": "sft"}]})
    with pytest.raises(ConfigError, match="is generated"):
        parse_section(
            PrepareConfig, "prepare", {"sources": [{"name": "a", "kind": "arithmetic", "path": "x"}]}
        )


@pytest.mark.slow
def test_arithmetic_smoke_reports_held_out_accuracy_through_dvc_repro(tmp_path):
    """prepare -> tokenizer -> SFT -> GRPO on exact_match + answer_format in one `dvc repro` of the
    profile's folder: every stage ran, and GRPO's metrics hold the held-out accuracy of SFT and of
    the policy on the same test problems, and each function's training curve."""
    root = copy_project(tmp_path / "project", MICRO_PARAMS)
    folder = root / SMOKE
    # the copy's code, whatever the environment's editable install points at (the stages run in `folder`)
    # one thread per process: on a busy machine torch's threads wait for each other many times over
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["dvc", "repro"], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    lock = YAML(typ="safe").load((folder / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "tokenizer", "sft", "grpo"}
    metrics = json.loads((folder / "metrics" / "grpo.json").read_text())
    for key in ("exact_match/reward", "exact_match/sft_reward", "answer_format/reward", "code/reward"):
        assert 0.0 <= metrics[key] <= 1.2, key  # accuracy and format rates; the sum weighs format 0.2
    assert metrics["eval/prompts"] > 0
    assert {"train/rewards/exact_match/mean", "train/rewards/answer_format/std"} <= set(metrics)
    rows = (folder / "outputs" / "grpo" / "held_out_generations.jsonl").read_text().splitlines()
    assert {"policy_exact_match", "sft_exact_match"} <= set(json.loads(rows[0]))


USER_MODULE = """
def answer_parity(completion_ids, answer, **kwargs):
    # varies with the sample and needs each row's own answer: a signal for GRPO whatever the model knows
    return [float((sum(ids) + int(a)) % 2 == 0) for ids, a in zip(completion_ids, answer)]
"""


@pytest.mark.slow
def test_two_processes_score_and_train_as_one(tmp_path, monkeypatch):
    """GRPO on exact_match, answer_format and a function of the user's own module (importable from
    PYTHONPATH, reading the `answer` column) as 1 process x 4 prompts and as 2 processes x 2 (torchrun,
    gloo): each process scores its block with its rows' columns (the prompts travel as PromptRows), and
    the gathered batches give the same per-function statistics and the same weights, moved from SFT's."""
    import importlib

    from flows.config import parse

    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "arith_user.py").write_text(USER_MODULE)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "user"), os.environ.get("PYTHONPATH")]))
    )
    profile = YAML(typ="safe").load((ROOT / SMOKE / "params.yaml").read_text())
    profile["grpo"]["rewards"]["functions"].append({"function": "arith_user:answer_parity", "weight": 1.0})
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    monkeypatch.chdir(upstream)
    for stage in ("prepare", "tokenizer", "sft"):
        importlib.import_module(f"alignment.stages.{stage}").run(
            parse(stage, profile[stage]), Paths(upstream), None
        )
    monkeypatch.chdir(tmp_path)
    runs = {}
    for processes in (1, 2):
        grpo = profile["grpo"] | {"prompts_per_batch": 4 // processes, "minibatch_size": 8 // processes}
        runs[processes] = fork(upstream, tmp_path / f"p{processes}", {**profile, "grpo": grpo})
        launch(runs[processes], ["grpo"], processes)
    one, two = (json.loads((runs[n] / "metrics" / "grpo.json").read_text()) for n in (1, 2))
    for name in ("exact_match", "answer_format", "answer_parity"):
        assert one[f"train/rewards/{name}/mean"] == pytest.approx(two[f"train/rewards/{name}/mean"], abs=1e-6)
    assert 0 < one["train/rewards/answer_parity/mean"] < 1  # a signal: the samples differ in reward
    trained = weights(runs[1] / "outputs/grpo")
    assert max_abs_difference(trained, weights(upstream / "outputs/sft")) > 1e-4
    assert max_abs_difference(trained, weights(runs[2] / "outputs/grpo")) < 1e-5
    assert one["exact_match/sft_reward"] == pytest.approx(two["exact_match/sft_reward"])
