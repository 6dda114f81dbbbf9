"""The evaluate and rlaif stages on the micro pipeline, in-process: the leaderboard, the generation
cache, MLflow child runs, an LLM judge over real HTTP (tests/integration/fake_openai.py), the local
transformers judge, and RLAIF labelling with its agreement."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from alignment import tracking
from alignment.config import flatten
from alignment.evaluation.judging import PairwiseJudge, Template
from alignment.evaluation.local_judge import TransformersJudgeBackend
from alignment.models.loading import load_causal_lm, load_tokenizer
from alignment.paths import Paths
from alignment.stages import evaluate, rlaif
from flows.config import parse
from tests.integration import fake_openai as fake
from tests.integration.fake_openai import FakeOpenAI, Reply

EVALUATE = {
    "models": {"sft": "outputs/sft", "tilted": "outputs/tilted", "gone": "outputs/never_trained"},
    "prompts": 6,
    "reference_max_tokens": 8,
    "max_length": 64,
    "samples": {"num_prompts": 2, "max_new_tokens": 8, "temperature": 1.0},
    "best_of_n": {"policy": "sft", "n": [2, 3]},
    "bootstrap_resamples": 200,
}


@pytest.fixture(scope="module")
def root(upstream):
    """The micro upstream plus a second policy: SFT with its output layer tilted (another hash)."""
    tilted = upstream / "outputs/tilted"
    if not tilted.exists():
        model = load_causal_lm(upstream / "outputs/sft")
        with torch.no_grad():
            model.transformer.ln_f.bias.add_(0.5)
        model.save_pretrained(tilted)
        load_tokenizer(upstream / "outputs/sft").save_pretrained(tilted)
    return upstream


def run_evaluate(root, monkeypatch, log=None, **overrides):
    monkeypatch.chdir(root)
    cfg = parse("evaluate", {**EVALUATE, **overrides})
    return evaluate.run(cfg, Paths(root), log)


def test_leaderboard_cache_and_mlflow_child_runs(root, monkeypatch, tmp_path):
    shutil.rmtree(root / "checkpoints/evaluate", ignore_errors=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with tracking.mlflow_stage_run("evaluate", root=tmp_path) as log:
        log.params(flatten(parse("evaluate", EVALUATE)))  # as the CLI does
        run_evaluate(root, monkeypatch, log)
        stage_run_id = log.run_id
    board = json.loads((root / "outputs/evaluate/leaderboard.json").read_text())
    rows = {r["model"]: r for r in board["models"]}
    assert list(rows) == ["sft", "tilted", "best_of_2", "best_of_3"] and board["skipped_models"] == ["gone"]
    assert set(board["judges"]) == {"rm", "gold"} and board["prompts"] == 6
    for row in rows.values():
        for judge in ("rm", "gold"):
            assert row[f"{judge}/n"] == 6 and row[f"{judge}/invalid"] == 0
            assert (
                row[f"{judge}/win_rate_ci_low"]
                <= row[f"{judge}/win_rate"]
                <= row[f"{judge}/win_rate_ci_high"]
            )
            assert row[f"{judge}/wins"] + row[f"{judge}/ties"] + row[f"{judge}/losses"] == 6
            assert 0 <= row[f"{judge}/lc_win_rate_ci_low"] <= row[f"{judge}/lc_win_rate"]
            assert row[f"{judge}/lc_win_rate"] <= row[f"{judge}/lc_win_rate_ci_high"] <= 1
        assert 1 <= row["length/mean_tokens"] <= 8
    assert rows["sft"]["objective/kl"] == 0 and rows["tilted"]["objective/kl"] != 0
    assert rows["sft"]["objective/kl_se"] == 0 and rows["tilted"]["objective/kl_se"] > 0
    assert (
        rows["sft"]["samples_drawn"] == 6 * 3 and rows["tilted"]["samples_drawn"] == 6
    )  # best-of-3 draws SFT's 3 per prompt
    # best-of-n shares SFT's samples (sample 0 is SFT's own), so its mean RM reward can only rise with n
    assert rows["sft"]["rm/reward"] <= rows["best_of_2"]["rm/reward"] <= rows["best_of_3"]["rm/reward"]
    assert rows["best_of_3"]["objective/kl"] == pytest.approx(np.log(3) - 2 / 3)

    markdown = (root / "outputs/evaluate/leaderboard.md").read_text()
    assert all(f"| {name} |" in markdown for name in rows) and "gold win rate, ties ½ [95% CI]" in markdown
    assert f"; LC {rows['tilted']['gold/lc_win_rate']:.3f}" in markdown
    assert f"{rows['tilted']['objective/kl']:.2f} ± {rows['tilted']['objective/kl_se']:.2f}" in markdown
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["tilted"]["gold/win_rate"] == rows["tilted"]["gold/win_rate"]
    assert (root / "plots/evaluate/frontier.csv").read_text().splitlines()[
        0
    ] == "model,objective/kl,rm/reward,gold/reward"
    bars = (root / "plots/evaluate/win_rates.csv").read_text().splitlines()
    assert bars[0] == "model_judge,win_rate,ci_low,ci_high,lc_win_rate" and len(bars) == 1 + 4 * 2
    responses = [
        json.loads(line) for line in (root / "outputs/evaluate/responses.jsonl").read_text().splitlines()
    ]
    assert len(responses) == 6 and {"prompt", "reference", "sft", "tilted", "sft/gold"} <= set(responses[0])

    import mlflow

    children = mlflow.search_runs(
        experiment_names=["alignment"],
        filter_string=f"tags.mlflow.parentRunId = '{stage_run_id}'",
        output_format="list",
    )
    by_model = {run.data.tags["model"]: run for run in children}
    assert set(by_model) == set(rows)
    assert by_model["tilted"].data.metrics["gold/win_rate"] == rows["tilted"]["gold/win_rate"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(stage_run_id)}
    assert {"leaderboard.md", "leaderboard.json", "plots"} <= artifacts
    params = mlflow.get_run(stage_run_id).data.params  # a key-like name (api_key_env) is dropped
    assert params["llm_judge.openai.timeout_s"] == "60.0" and "llm_judge.openai.api_key_env" not in params

    # the same evaluation again: every sample comes from the cache, the numbers are identical
    run_evaluate(root, monkeypatch)
    again = {
        r["model"]: r for r in json.loads((root / "outputs/evaluate/leaderboard.json").read_text())["models"]
    }
    assert again["sft"]["samples_drawn"] == again["tilted"]["samples_drawn"] == 0
    assert {k: v for k, v in again["tilted"].items() if k != "samples_drawn"} == {
        k: v for k, v in rows["tilted"].items() if k != "samples_drawn"
    }


def longer_wins(request: dict, call_number: int) -> Reply:
    """A length-biased judge: the longer answer wins, equal lengths tie."""
    shown = fake.shown_answers(request)
    a, b = len(shown["A"]), len(shown["B"])
    return Reply(f"[[{'C' if a == b else 'A' if a > b else 'B'}]]")


def served_judge(base_url: str, model: str, api_key_env: str | None = None, **shared) -> dict:
    """A judge section for the fake server at `base_url` (fast retries); `shared`: e.g. max_prompts."""
    return {
        "backend": "openai",
        **shared,
        "openai": {"base_url": base_url, "model": model, "api_key_env": api_key_env, "backoff_s": 0.01},
    }


def test_llm_judge_over_http_joins_the_leaderboard(root, monkeypatch):
    monkeypatch.setenv("EVAL_JUDGE_KEY", "sk-test-never-logged")
    with FakeOpenAI(longer_wins) as server:
        run_evaluate(
            root,
            monkeypatch,
            models={"sft": "outputs/sft"},
            best_of_n={"n": []},
            llm_judge=served_judge(server.base_url, "judge-7b", "EVAL_JUDGE_KEY", max_prompts=4),
        )
        asked = len(server.requests)
    board = json.loads((root / "outputs/evaluate/leaderboard.json").read_text())
    row = board["models"][0]
    responses = [
        json.loads(line) for line in (root / "outputs/evaluate/responses.jsonl").read_text().splitlines()
    ]
    expected = [np.sign(len(r["sft"]) - len(r["reference"])) for r in responses[:4]]
    assert row["llm/n"] == 4 and row["llm/wins"] == sum(e == 1 for e in expected)
    assert row["llm/losses"] == sum(e == -1 for e in expected) and asked == 8  # both orders of 4 prompts
    assert row["llm/consistency"] == 1.0  # a length judge has no position bias
    assert 0 <= row["llm/lc_win_rate"] <= 1  # on the same 4 prompts, with their token lengths
    identity = board["judges"]["llm"]
    assert (
        identity["model"] == "judge-7b"
        and identity["template"] == "sentiment-pair"
        and len(identity["template_sha256"]) == 64
    )
    assert identity["stats"]["requests"] == 8 and identity["stats"]["cache_hits"] == 0
    assert "sk-test" not in (root / "outputs/evaluate/leaderboard.json").read_text()
    with FakeOpenAI(longer_wins) as server:  # a re-run asks nothing: verdicts come from the cache
        run_evaluate(
            root,
            monkeypatch,
            models={"sft": "outputs/sft"},
            best_of_n={"n": []},
            llm_judge=served_judge(server.base_url, "judge-7b", "EVAL_JUDGE_KEY", max_prompts=4),
        )
        assert server.requests == []
    stats = json.loads((root / "outputs/evaluate/leaderboard.json").read_text())["judges"]["llm"]["stats"]
    assert stats["requests"] == 0 and stats["cache_hits"] == 8


def test_local_transformers_judge_reads_verdict_probabilities(root):
    tokenizer = load_tokenizer(root / "outputs/sft")
    backend = TransformersJudgeBackend(
        "sft", model=load_causal_lm(root / "outputs/sft"), tokenizer=tokenizer, batch_size=3
    )
    # a short template fits the micro model's 64 positions whole, so the shared-prefix cache is used
    template = Template("short", "Judge.", "Q: {question} A: {answer_a} B: {answer_b} Verdict:")
    requests = [template.messages("A film", "good" * k, "bad") for k in (1, 5, 9, 2)]
    answers = backend.complete(requests)
    batched = torch.tensor(backend.last_probabilities)
    alone = torch.cat([backend.probabilities([r]) for r in requests])
    assert torch.allclose(batched, alone, atol=1e-5)  # left padding and positions do not change a verdict
    assert torch.allclose(batched.sum(-1), torch.ones(4)) and all(
        a in ("[[A]]", "[[B]]", "[[C]]") for a in answers
    )
    judgement = PairwiseJudge("llm", backend, template).compare(
        ["A film"] * 4, ["good", "fine", "ok", "great"], ["bad"] * 4
    )
    assert not np.isnan(judgement.outcomes).any() and all(d["asks"] == 2 for d in judgement.details)


def oracle(pairs: list[dict]) -> fake.Respond:
    """Knows the labels: prefers whichever shown answer its pair labels chosen."""
    winner = {frozenset((p["chosen"], p["rejected"])): p["chosen"] for p in pairs}

    def respond(request: dict, call_number: int) -> Reply:
        shown = fake.shown_answers(request)
        return Reply(f"[[{'A' if winner[frozenset(shown.values())] == shown['A'] else 'B'}]]")

    return respond


def test_rlaif_labels_pairs_and_reports_agreement(root, monkeypatch):
    monkeypatch.chdir(root)
    labelled = [
        json.loads(line)
        for f in (
            "outputs/pairs/train.jsonl",
            "outputs/pairs/eval.jsonl",
            "outputs/data/preference_train.jsonl",
            "outputs/data/preference_eval.jsonl",
        )
        for line in (root / f).read_text().splitlines()
    ]
    params = {"sources": ["imdb_pairs", "prepared"], "train_pairs": 6, "eval_pairs": 3}
    with FakeOpenAI(oracle(labelled)) as server:
        judge = served_judge(server.base_url, "oracle")
        metrics = rlaif.run(parse("rlaif", {**params, "judge": judge}), Paths(root), None)
    train = [json.loads(line) for line in (root / "outputs/rlaif/train.jsonl").read_text().splitlines()]
    assert metrics["train/imdb_pairs/agreement"] == metrics["train/prepared/agreement"] == 1.0
    assert (
        metrics["train/imdb_pairs/kept"] == 6
        and len(train) == 12
        and {r["origin"] for r in train} == {"imdb_pairs", "hh"}
    )
    assert all(r["source"] == "rlaif" and r["agrees_with_label"] for r in train)

    with FakeOpenAI(fake.position_biased) as server:  # every pair a disagreement between orders: nothing kept
        judge = served_judge(server.base_url, "biased")
        metrics = rlaif.run(parse("rlaif", {**params, "judge": judge}), Paths(root), None)
    assert metrics["train/imdb_pairs/kept"] == 0 and metrics["train/imdb_pairs/tie_or_disagreement"] == 6
    assert metrics["train/imdb_pairs/first_position_rate"] == 1.0
    assert (root / "outputs/rlaif/train.jsonl").read_text() == ""
