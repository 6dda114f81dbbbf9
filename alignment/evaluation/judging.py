"""Judges behind one interface, and the statistics of win rates.

A judge compares a model's response with a reference response to the same prompt and returns, per
prompt, an outcome from the model's side: WIN (1), TIE (0), LOSS (-1) or invalid (NaN, excluded from
every rate, never counted as a win or a loss).

- `ScalarJudge` scores each response on its own (the reward model, the gold scorer): a win when the
  model's response scores higher, a tie when the scores are equal.
- `PairwiseJudge` asks an LLM which of two responses is better, with an MT-Bench prompt, in both
  orders (model as A, then model as B). The model wins only when both orders prefer it, loses only
  when both prefer the reference; any disagreement or tie is a tie. A verdict that cannot be parsed
  is asked again (`parse_retries` times, the attempt number reaching the backend so that it may
  sample differently and cache each attempt separately); still unparseable, the row is invalid.

Statistics: `win_rate = (W + T/2) / N`, a tie counting half as in AlpacaEval, the length-controlled rate
and the held-out comparisons with SFT, and `win_rate_strict = W / N` (ties count nothing), over the N valid
rows, with percentile-bootstrap 95% intervals from resampling prompts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

WIN, TIE, LOSS = 1.0, 0.0, -1.0
VERDICT = re.compile(r"\[\[([ABC])\]\]")


@dataclass
class Judgement:
    """One judge's outcomes for one model against the references, row i for prompt i."""

    outcomes: np.ndarray  # WIN / TIE / LOSS / NaN (invalid)
    scores: np.ndarray | None = None  # a scalar judge's score of the model's and the reference's response
    reference_scores: np.ndarray | None = None
    details: list[dict] = field(default_factory=list)  # per row, what the judge said (both orders for an LLM)


class Judge(Protocol):
    name: str

    def identity(self) -> dict:
        """What produced the verdicts (kind, model, template and its hash), recorded with the results."""

    def compare(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str],
        finished: tuple[Sequence[bool], Sequence[bool]] | None = None,
    ) -> Judgement:
        """`finished`: (responses', references') flags, true for a complete answer (a sample that ended
        with EOS), false for one cut at a length limit; None: all complete."""


class ScalarJudge:
    """Win if score(model response) > score(reference response). `score(prompts, responses, finished)`;
    scores are remembered per (prompt, response, finished): the references, compared with every model,
    and best-of-n's picks are scored once."""

    def __init__(
        self, name: str, score: Callable[[list[str], list[str], list[bool]], Sequence[float]], identity: dict
    ):
        self.name, self.score, self._identity = name, score, identity
        self._known: dict[tuple[str, str, bool], float] = {}

    def identity(self) -> dict:
        return {"kind": "scalar", **self._identity}

    def scores(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> np.ndarray:
        finished = [True] * len(prompts) if finished is None else [bool(f) for f in finished]
        keys = list(zip(prompts, responses, finished))
        new = list(dict.fromkeys(key for key in keys if key not in self._known))
        if new:
            values = np.asarray(self.score(*(list(column) for column in zip(*new))), dtype=float)
            self._known |= dict(zip(new, values.tolist()))
        return np.array([self._known[key] for key in keys], dtype=float)

    def compare(self, prompts, responses, references, finished=None) -> Judgement:
        ours_finished, theirs_finished = finished if finished is not None else (None, None)
        ours = self.scores(prompts, responses, ours_finished)
        theirs = self.scores(prompts, references, theirs_finished)
        return Judgement(np.sign(ours - theirs), ours, theirs)


# ---------------------------------------------------------------- pairwise LLM judge


@dataclass(frozen=True)
class Template:
    """An MT-Bench-style pairwise prompt: a system prompt and a user template with {question},
    {answer_a}, {answer_b}; the verdict is [[A]], [[B]] or [[C]] (tie)."""

    name: str
    system_prompt: str
    prompt_template: str

    @property
    def sha256(self) -> str:
        text = json.dumps(
            {"system_prompt": self.system_prompt, "prompt_template": self.prompt_template}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        user = self.prompt_template.format(question=question, answer_a=answer_a, answer_b=answer_b)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]


def load_template(path: str | Path, name: str) -> Template:
    path = Path(path)
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        if row.get("name") == name:
            missing = {"system_prompt", "prompt_template"} - set(row)
            if missing:
                raise ValueError(f"{path}:{line_number}: template {name!r} lacks {sorted(missing)}")
            for placeholder in ("{question}", "{answer_a}", "{answer_b}"):
                if placeholder not in row["prompt_template"]:
                    raise ValueError(
                        f"{path}:{line_number}: template {name!r}: prompt_template lacks {placeholder}"
                    )
            return Template(name, row["system_prompt"], row["prompt_template"])
    raise ValueError(f"{path}: no template named {name!r}")


def parse_verdict(text: str | None) -> str | None:
    """ "A", "B" or "C" (tie): the [[X]] the judge's answer names; None when it names none, or more
    than one different verdict (MT-Bench takes the first of [[A]], [[B]], [[C]] it finds; an answer
    that says both "[[A]]" and "[[B]]" is better read as unparseable and asked again)."""
    if not text:
        return None
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


class Backend(Protocol):
    def identity(self) -> dict: ...

    def complete(self, requests: list[list[dict[str, str]]], attempt: int = 0) -> list[str | None]:
        """The judge's answer to each chat (None when the backend gave up on it); `attempt` > 0
        asks again after an unparseable answer."""


def combine(model_as_a: str | None, model_as_b: str | None) -> float:
    """The model's outcome from the verdicts of the two orders (model shown first, then second)."""
    if model_as_a is None or model_as_b is None:
        return float("nan")
    first = {"A": WIN, "B": LOSS, "C": TIE}[model_as_a]
    second = {"A": LOSS, "B": WIN, "C": TIE}[model_as_b]
    return first if first == second else TIE


class JudgeFailed(RuntimeError):
    """Too few of a judge's comparisons got a valid verdict: the judge, not the rows, failed."""


class PairwiseJudge:
    def __init__(
        self,
        name: str,
        backend: Backend,
        template: Template,
        parse_retries: int = 2,
        min_valid_fraction: float = 0.0,
    ):
        if parse_retries < 0:
            raise ValueError(f"parse_retries must be >= 0, got {parse_retries}")
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must lie in [0, 1], got {min_valid_fraction}")
        self.name, self.backend, self.template, self.parse_retries = name, backend, template, parse_retries
        self.min_valid_fraction = min_valid_fraction

    def identity(self) -> dict:
        return {
            "kind": "pairwise_llm",
            "template": self.template.name,
            "template_sha256": self.template.sha256,
            "parse_retries": self.parse_retries,
            **self.backend.identity(),
        }

    def verdicts(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> tuple[list[str | None], list[int]]:
        """One order: the parsed verdict per row (A = `first` is better) and how many asks each took."""
        requests = [self.template.messages(q, a, b) for q, a, b in zip(questions, first, second)]
        verdicts: list[str | None] = [None] * len(requests)
        asks = [0] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(self.parse_retries + 1):
            if not pending:
                break
            answers = self.backend.complete([requests[i] for i in pending], attempt=attempt)
            for i, answer in zip(pending, answers):
                verdicts[i], asks[i] = parse_verdict(answer), asks[i] + 1
            pending = [i for i in pending if verdicts[i] is None]
        return verdicts, asks

    def compare(self, prompts, responses, references, finished=None) -> Judgement:
        """`finished` is not used: the judge reads the texts, which show where an answer was cut."""
        as_a, asks_a = self.verdicts(prompts, responses, references)
        as_b, asks_b = self.verdicts(prompts, references, responses)
        outcomes = np.array([combine(a, b) for a, b in zip(as_a, as_b)], dtype=float)
        valid = int(np.sum(~np.isnan(outcomes)))
        if len(outcomes) and valid < self.min_valid_fraction * len(outcomes):
            # a judge that is down (or answers garbage) for the whole run would give NaN win rates, or
            # an RM trained on nothing, and a stage DVC records as done
            stats = getattr(self.backend, "stats", None)
            raise JudgeFailed(
                f"judge {self.name}: {valid} of {len(outcomes)} comparisons got a valid verdict, fewer than "
                f"min_valid_fraction={self.min_valid_fraction}"
                + (f" (backend: {dict(stats)})" if stats else "")
                + "; is the judge reachable and answering in the template's format?"
            )
        details = [
            {"model_first": a, "model_second": b, "asks": x + y}
            for a, b, x, y in zip(as_a, as_b, asks_a, asks_b)
        ]
        return Judgement(outcomes, details=details)


def position_stats(details: list[dict]) -> dict[str, float]:
    """How a pairwise judge treats positions: `consistency`, the fraction of rows with both orders
    valid whose two verdicts agree once the swap is undone; `first_position_rate`, the fraction of
    valid single-order verdicts that chose whichever response was shown first (0.5 is unbiased,
    ignoring ties)."""
    pairs = [(d["model_first"], d["model_second"]) for d in details if d["model_first"] and d["model_second"]]
    singles = [v for d in details for v in (d["model_first"], d["model_second"]) if v]
    agree = [{"A": "B", "B": "A", "C": "C"}[a] == b for a, b in pairs]
    decided = [v for v in singles if v != "C"]
    return {
        "consistency": float(np.mean(agree)) if agree else float("nan"),
        "first_position_rate": float(np.mean([v == "A" for v in decided])) if decided else float("nan"),
        "invalid_single_verdicts": float(
            sum(1 for d in details for v in (d["model_first"], d["model_second"]) if v is None)
        ),
    }


# ---------------------------------------------------------------- statistics


def rates(outcomes: np.ndarray) -> dict[str, float]:
    """Counts and the two win rates over the valid rows: ties half (`win_rate`) and ties none (`_strict`)."""
    outcomes = np.asarray(outcomes, dtype=float)
    valid = outcomes[~np.isnan(outcomes)]
    n, wins, ties = len(valid), float(np.sum(valid == WIN)), float(np.sum(valid == TIE))
    return {
        "n": float(n),
        "wins": wins,
        "ties": ties,
        "losses": float(np.sum(valid == LOSS)),
        "invalid": float(len(outcomes) - n),
        "win_rate": (wins + 0.5 * ties) / n if n else float("nan"),  # a tie counts half
        "win_rate_strict": wins / n if n else float("nan"),  # a tie counts nothing
    }


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` over rows of `values` (NaN rows dropped first)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)])
    tail = (1 - level) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def win_rate_summary(outcomes: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """`rates` plus a 95% bootstrap interval for each win rate (`win_rate_ci_low`, ..._high)."""
    summary = rates(outcomes)
    for key, statistic in (
        ("win_rate", lambda v: np.mean(v == WIN) + 0.5 * np.mean(v == TIE)),
        ("win_rate_strict", lambda v: np.mean(v == WIN)),
    ):
        summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = bootstrap_ci(
            outcomes, statistic, resamples, seed=seed
        )
    return summary


def judge_template(cfg, source: str, root: Path = Path(".")) -> Template:
    """An `LLMJudgeConfig`'s template (its `templates` file relative to the project `root`); by default
    the sentiment adaptation for IMDb prompts and MT-Bench's pair-v2 for dialogue."""
    path = Path(cfg.templates) if Path(cfg.templates).is_absolute() else root / cfg.templates
    return load_template(path, cfg.template or ("sentiment-pair" if source == "imdb" else "pair-v2"))


def build_backend(cfg, cache_dir: Path | None = None, dtype=None) -> Backend:
    """The backend an `LLMJudgeConfig` describes (a served model, or a local one loaded here on this
    process's device, in `dtype`: a torch dtype, None as the checkpoint stores it)."""
    if cfg.backend == "openai":
        from alignment.evaluation.openai_judge import OpenAIChatBackend

        served = cfg.openai
        return OpenAIChatBackend(
            served.base_url,
            served.model,
            served.api_key_env,
            served.timeout_s,
            served.max_retries,
            served.backoff_s,
            served.concurrency,
            served.temperature,
            max_tokens=served.max_tokens,
            cache_dir=cache_dir,
        )
    if cfg.backend == "transformers":
        from alignment.evaluation.local_judge import TransformersJudgeBackend
        from alignment.models.loading import gguf_alias

        local = cfg.transformers
        folder, gguf = gguf_alias(local.name_or_path, local.gguf_file)
        return TransformersJudgeBackend(folder, gguf, batch_size=local.batch_size, dtype=dtype)
    raise ValueError(f"no LLM judge for backend {cfg.backend!r}")


def build_llm_judge(
    cfg, source: str, cache_dir: Path | None = None, name: str = "llm", root: Path = Path("."), dtype=None
) -> PairwiseJudge:
    return PairwiseJudge(
        name,
        build_backend(cfg, cache_dir, dtype),
        judge_template(cfg, source, root),
        cfg.parse_retries,
        cfg.min_valid_fraction,
    )
