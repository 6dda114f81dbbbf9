"""The OpenAI-compatible judge backend against a real HTTP server on loopback
(tests/integration/fake_openai.py), through `PairwiseJudge`, so parsing, both orders, re-asks, retries and
the cache are tested together."""

from __future__ import annotations

import logging
import math
import time

import pytest

from alignment.evaluation.judging import PairwiseJudge, load_template, position_stats, rates, win_rate_summary
from alignment.evaluation.openai_judge import JudgeBackendError, OpenAIChatBackend
from tests.conftest import ROOT
from tests.integration import fake_openai as fake
from tests.integration.fake_openai import FakeOpenAI

TEMPLATES = ROOT / "data/judge/templates.jsonl"
SENTIMENT = load_template(TEMPLATES, "sentiment-pair")
FAST = {"api_key_env": None, "timeout_s": 0.5, "backoff_s": 0.01}

# Hand-worked: "great" only in the model's response wins in both orders (x3), only in the reference
# loses (x1), in neither ties (x1): W=3, L=1, T=1 of N=5 -> win_rate (3 + 1/2)/5 = 0.7, strict 3/5.
PROMPTS = [f"Opening {i} of a review:" for i in range(5)]
RESPONSES = ["a great film", "great acting", "simply great", "rather bad", "it was fine"]
REFERENCES = ["a bad film", "dull acting", "simply awful", "truly great", "it was okay"]


def judge(
    server: FakeOpenAI, template=SENTIMENT, model: str = "judge", parse_retries: int = 2, **backend
) -> PairwiseJudge:
    backend = OpenAIChatBackend(server.base_url, model, **{**FAST, **backend})
    return PairwiseJudge("llm", backend, template, parse_retries=parse_retries)


def test_sensible_judge_outcomes_and_win_rates():
    with FakeOpenAI(fake.sensible()) as server:
        judgement = judge(server).compare(PROMPTS, RESPONSES, REFERENCES)
        both = judge(server).compare(["Opening:"], ["great fun"], ["great cast"])
    assert judgement.outcomes.tolist() == [1, 1, 1, -1, 0] and both.outcomes.tolist() == [0]
    assert [d["model_first"] for d in judgement.details] == ["A", "A", "A", "B", "C"]
    assert [d["model_second"] for d in judgement.details] == ["B", "B", "B", "A", "C"]
    summary = win_rate_summary(judgement.outcomes, resamples=200)
    assert {k: summary[k] for k in ("n", "wins", "losses", "ties", "invalid")} == {
        "n": 5,
        "wins": 3,
        "losses": 1,
        "ties": 1,
        "invalid": 0,
    }
    assert summary["win_rate"] == pytest.approx(0.7) and summary["win_rate_strict"] == pytest.approx(0.6)
    assert summary["win_rate_ci_low"] <= 0.7 <= summary["win_rate_ci_high"]
    assert len(server.requests) == 2 * 6  # both orders, each verdict parsed on the first ask


def test_position_biased_judge_is_all_ties():
    with FakeOpenAI(fake.position_biased) as server:
        judgement = judge(server).compare(PROMPTS, RESPONSES, REFERENCES)
    summary = rates(judgement.outcomes)
    assert judgement.outcomes.tolist() == [0] * 5
    assert summary["win_rate"] == 0.5 and summary["win_rate_strict"] == 0
    assert position_stats(judgement.details) == {
        "consistency": 0.0,
        "first_position_rate": 1.0,
        "invalid_single_verdicts": 0.0,
    }


def test_garbage_judge_rows_are_invalid_after_every_reask():
    with FakeOpenAI(fake.garbage) as server:
        judgement = judge(server, parse_retries=2).compare(PROMPTS[:3], RESPONSES[:3], REFERENCES[:3])
    summary = rates(judgement.outcomes)
    assert summary["n"] == 0 and summary["invalid"] == 3 and math.isnan(summary["win_rate"])
    assert [d["asks"] for d in judgement.details] == [2 * 3] * 3  # (1 + parse_retries) per order
    assert len(server.requests) == 3 * 2 * 3
    assert {r.get("seed") for r in server.requests} == {None, 1, 2}


def test_garbage_then_valid_reasks_at_retry_temperature_with_a_seed():
    with FakeOpenAI(fake.garbage_then_valid(fake.sensible())) as server:
        judgement = judge(server, retry_temperature=0.9).compare(PROMPTS[:1], RESPONSES[:1], REFERENCES[:1])
    assert judgement.outcomes.tolist() == [1] and judgement.details[0]["asks"] == 4
    first, retry = server.requests[0], server.requests[1]
    assert first["temperature"] == 0.0 and "seed" not in first
    assert retry["temperature"] == 0.9 and retry["seed"] == 1 and retry["messages"] == first["messages"]


def test_transient_errors_are_retried():
    with FakeOpenAI(fake.flaky(fake.sensible(), failures=3)) as server:
        j = judge(server, max_retries=4)
        judgement = j.compare(PROMPTS[:2], RESPONSES[:2], REFERENCES[:2])
    assert judgement.outcomes.tolist() == [1, 1]
    assert j.backend.stats == {"requests": 4 * 4, "cache_hits": 0, "retries": 3 * 4, "failures": 0}


def test_a_server_that_always_fails_gives_invalid_rows(caplog):
    with FakeOpenAI(fake.failing(500)) as server:
        j = judge(server, max_retries=2, parse_retries=0)
        judgement = j.compare(PROMPTS[:1], RESPONSES[:1], REFERENCES[:1])
    assert math.isnan(judgement.outcomes[0]) and rates(judgement.outcomes)["invalid"] == 1
    assert j.backend.stats == {"requests": 2 * 3, "cache_hits": 0, "retries": 2 * 2, "failures": 2}
    assert "HTTP 500" in caplog.text


def test_a_timeout_is_retried():
    with FakeOpenAI(fake.slow(fake.sensible(), delay_s=1.0)) as server:
        backend = OpenAIChatBackend(server.base_url, "judge", **{**FAST, "timeout_s": 0.3})
        started = time.perf_counter()
        answers = backend.complete([SENTIMENT.messages("Opening", "great", "bad")])
    assert answers == ["Comparing the two, my verdict: [[A]]"]
    assert backend.stats["requests"] == 2 and backend.stats["retries"] == 1
    assert time.perf_counter() - started < 1.0


def test_unauthorized_raises_at_once_without_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    with (
        FakeOpenAI(fake.failing(401, "Incorrect API key provided: sk-secret-123")) as server,
        pytest.raises(JudgeBackendError) as raised,
    ):
        judge(server, api_key_env="JUDGE_TEST_KEY").compare(PROMPTS[:1], RESPONSES[:1], REFERENCES[:1])
    assert len(server.requests) == 1
    message = str(raised.value)
    assert "401" in message and "JUDGE_TEST_KEY" in message and server.base_url in message
    assert "Incorrect API key" in message and "sk-secret-123" not in message


def test_the_api_key_is_sent_and_never_leaks(monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "alignment"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    with FakeOpenAI(fake.flaky(fake.sensible(), failures=1)) as server:
        j = judge(server, api_key_env="JUDGE_TEST_KEY", cache_dir=tmp_path)
        j.compare(PROMPTS[:2], RESPONSES[:2], REFERENCES[:2])
    assert {h["authorization"] for h in server.headers} == {"Bearer sk-secret-123"}
    assert caplog.text and "sk-secret-123" not in caplog.text
    assert "sk-secret-123" not in repr(j.backend) + str(j.identity())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any("sk-secret-123" in p.read_text() for p in files)


def test_a_missing_key_variable_is_logged_by_name_only(monkeypatch, caplog):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="alignment.evaluation.openai_judge")
    with FakeOpenAI(fake.sensible()) as server:
        backend = OpenAIChatBackend(server.base_url, "judge", **{**FAST, "api_key_env": "JUDGE_TEST_KEY"})
        assert backend.complete([SENTIMENT.messages("q", "a", "b")])
    assert "JUDGE_TEST_KEY" in caplog.text and "authorization" not in server.headers[0]


def test_cached_answers_make_no_http_calls(tmp_path):
    with FakeOpenAI(fake.sensible()) as server:
        first = judge(server, cache_dir=tmp_path).compare(PROMPTS, RESPONSES, REFERENCES)
        calls = len(server.requests)
        again = judge(server, cache_dir=tmp_path)
        second = again.compare(PROMPTS, RESPONSES, REFERENCES)
        assert len(server.requests) == calls and again.backend.stats["cache_hits"] == 2 * 5
        assert second.outcomes.tolist() == first.outcomes.tolist()
        judge(server, template=load_template(TEMPLATES, "pair-v2"), cache_dir=tmp_path).compare(
            PROMPTS, RESPONSES, REFERENCES
        )
        assert len(server.requests) == 2 * calls
        judge(server, model="another-judge", cache_dir=tmp_path).compare(PROMPTS, RESPONSES, REFERENCES)
        assert len(server.requests) == 3 * calls


def test_concurrency_is_bounded():
    with FakeOpenAI(fake.slow(fake.sensible(), delay_s=0.1, calls=-1)) as server:
        backend = OpenAIChatBackend(server.base_url, "judge", **{**FAST, "concurrency": 3})
        requests = [SENTIMENT.messages(f"Opening {i}", "great", "bad") for i in range(12)]
        answers = backend.complete(requests)
    assert all("[[A]]" in answer for answer in answers)
    assert 1 < server.max_in_flight <= 3


def test_results_keep_the_input_order():
    with FakeOpenAI(fake.sensible()) as server:
        backend = OpenAIChatBackend(server.base_url, "judge", **{**FAST, "concurrency": 4})
        pairs = [("great", "bad"), ("bad", "great"), ("bad", "bad")] * 4
        answers = backend.complete([SENTIMENT.messages(f"q{i}", a, b) for i, (a, b) in enumerate(pairs)])
    assert [answer[-5:] for answer in answers] == ["[[A]]", "[[B]]", "[[C]]"] * 4


@pytest.mark.parametrize(
    "bad", [{"base_url": "localhost:8000"}, {"concurrency": 0}, {"timeout_s": 0}, {"max_retries": -1}]
)
def test_bad_arguments_fail_before_any_request(bad):
    with FakeOpenAI(fake.sensible()) as server, pytest.raises(ValueError):
        OpenAIChatBackend(**{"base_url": server.base_url, "model": "judge", **FAST, **bad})
    assert server.requests == []
