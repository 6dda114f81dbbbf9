"""Win rates against the reference (gold) responses: the pieces of the `evaluate` stage that other
stages (ReST's held-out guard) reuse.

Every model continues the same held-out prompts with the same decoding settings, and prompt i is
sampled with a seed derived from (seed, prompt) alone: the sample does not depend on the batch it was
drawn in, so generations are cached per (model content hash, decoding settings, prompt) and a
re-evaluation samples only what changed. The seeds are the same for every model (common random
numbers: two similar policies draw similar samples, which narrows the difference between them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignment.data.io import read_jsonl
from alignment.data.sources import prompt_key
from alignment.evaluation.judging import Judge, Judgement, ScalarJudge, position_stats, win_rate_summary
from alignment.evaluation.length_control import lc_win_rate_summary
from alignment.models.generation import prompt_seed  # noqa: F401 (re-exported: evaluation users seed by prompt)
from alignment.paths import Paths
from alignment.training import distributed

logger = logging.getLogger(__name__)


@dataclass
class References:
    prompts: list[str]  # rendered for the models' tokenizer (chat.render_prompt)
    questions: list[str]  # the same prompts as plain text, for an LLM judge (HH format for conversations)
    responses: list[str]
    finished: list[bool]  # false where the response was cut to max_tokens


def held_out_references(
    paths: Paths, source: str, split: str, limit: int, tokenizer, max_tokens: int | None
) -> References:
    """The first `limit` distinct prompts of `source` in the SFT `split` and their held-out responses
    (the human review continuation; HH's chosen reply), cut to `max_tokens` tokens when given. The
    prompts carry their rows' other columns (`PromptRow`: a reference answer for a reward from code)."""
    from alignment.data.chat import render_prompt, render_row
    from alignment.data.prompts import PromptRow

    path = paths.data / f"sft_{split}.jsonl"
    out, seen = References([], [], [], []), set()
    for row in read_jsonl(path):
        key = prompt_key(row["prompt"])
        if row["source"] != source or key in seen:
            continue
        seen.add(key)
        rendered = render_row(tokenizer, row)
        response, finished = rendered["response"], True
        if max_tokens is not None:
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            response = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
            finished = len(ids) <= max_tokens
        columns = {k: v for k, v in row.items() if k not in ("prompt", "response", "source")}
        out.prompts.append(PromptRow(rendered["prompt"], columns))
        out.questions.append(render_prompt(None, row["prompt"]))
        out.responses.append(response)
        out.finished.append(finished)
        if len(out.prompts) == limit:
            break
    if not out.prompts:
        raise ValueError(f"{path}: no rows with source {source!r}")
    return out


class GenerationCache:
    """Samples keyed by (model content hash, decoding settings, prompt, sample index), one jsonl file
    per (model, settings) under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _file(self, model_hash: str, settings: dict) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{model_hash}-{key}.jsonl"

    def load(self, model_hash: str, settings: dict) -> dict[tuple[str, int], dict]:
        path = self._file(model_hash, settings)
        rows = read_jsonl(path) if path.exists() else []
        return {(r["prompt"], r["index"]): r for r in rows}

    def add(self, model_hash: str, settings: dict, rows: list[dict]) -> None:
        path = self._file(model_hash, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


@dataclass
class Samples:
    responses: list[str]
    tokens: np.ndarray  # response length in tokens, EOS included
    ended: np.ndarray  # True when the model emitted EOS before max_new_tokens
    ids: list[tuple[list[int], list[int]]]  # (prompt ids, response ids) as sampled: what KL is scored on


def sample(
    model,
    model_hash: str,
    tokenizer,
    prompts: list[str],
    settings: dict,
    cache: GenerationCache | None,
    samples_per_prompt: int = 1,
    batch_size: int = 256,
) -> tuple[list[Samples], int]:
    """`samples_per_prompt` samples of every prompt (list index j: the j-th sample of each prompt),
    from the cache where it has them, drawn from `model` where it has not. Returns the samples and how
    many were drawn now; `batch_size` prompts are sampled at once. A cached row without the sampled ids
    (written before they were kept) counts as missing: its per-prompt seed draws the same sample again,
    ids included."""
    from alignment.models.generation import ended, generate_ids

    cached = cache.load(model_hash, settings) if cache else {}
    wanted = [(p, j) for j in range(samples_per_prompt) for p in prompts]
    missing = [key for key in wanted if "response_ids" not in cached.get(key, {})]
    if missing:
        # several processes: each draws its block of the missing samples, and all gather
        drawn = distributed.map_sharded(
            lambda block: generate_ids(
                model,
                tokenizer,
                [p for p, _ in block],
                settings["max_new_tokens"],
                settings["temperature"],
                settings["top_p"],
                batch_size,
                seeds=[prompt_seed(settings["seed"], p, j) for p, j in block],
            ),
            missing,
        )
        finished = ended(tokenizer, drawn, model)
        new = [
            {
                "prompt": p,
                "index": j,
                "response": tokenizer.decode(ids, skip_special_tokens=True),
                "tokens": len(ids),
                "ended": done,
                "prompt_ids": prompt_ids,
                "response_ids": ids,
            }
            for (p, j), (prompt_ids, ids), done in zip(missing, drawn, finished)
        ]
        cached |= {(r["prompt"], r["index"]): r for r in new}
        if cache and distributed.is_main():
            cache.add(model_hash, settings, new)
    out = []
    for j in range(samples_per_prompt):
        rows = [cached[(p, j)] for p in prompts]
        out.append(
            Samples(
                [r["response"] for r in rows],
                np.array([r["tokens"] for r in rows]),
                np.array([r["ended"] for r in rows], dtype=bool),
                [(r["prompt_ids"], r["response_ids"]) for r in rows],
            )
        )
    return out, len(missing)


def length_stats(samples: Samples, words: list[str] | None = None) -> dict[str, float]:
    texts = samples.responses if words is None else words
    return {
        "length/mean_tokens": float(samples.tokens.mean()),
        "length/median_tokens": float(np.median(samples.tokens)),
        "length/mean_words": float(np.mean([len(t.split()) for t in texts])),
        "length/ended_with_eos": float(samples.ended.mean()),
    }


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Tokens per text as the tokenizer encodes it without special tokens (as the references are cut)."""
    return np.array([len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts])


def content_tokens(samples: Samples) -> np.ndarray:
    """Response length in tokens without the EOS: the reference has none and the judge never sees it."""
    return samples.tokens - samples.ended


def judge_model(
    judges: list[Judge],
    prompts: list[str],
    responses: list[str],
    references: list[str],
    limits: dict[str, int],
    resamples: int,
    seed: int,
    lengths: tuple[np.ndarray, np.ndarray] | None = None,
    finished: tuple[np.ndarray, np.ndarray] | None = None,
    questions: list[str] | None = None,
) -> tuple[dict[str, float], dict[str, Judgement]]:
    """Every judge's verdicts for one model against the references: `<judge>/win_rate` with its 95%
    bootstrap interval (ties half), `<judge>/win_rate_strict` (ties none), counts, the mean score of a scalar
    judge (`<judge>/reward`, `<judge>/reference_reward`) and a pairwise judge's position statistics.
    With `lengths` (the responses' and the references' lengths in tokens, per prompt), also
    `<judge>/lc_win_rate`, the length-controlled win rate, with its interval (`length_control`).
    `limits[judge]` judges only that many of the first prompts (an LLM judge's budget). `finished`: the
    responses' and references' flags (complete, or cut at a length limit), for a scalar judge that
    scores a complete answer closed with EOS; `questions`: the prompts as plain text, what a pairwise
    LLM judge reads (default: `prompts`)."""
    metrics: dict[str, float] = {}
    judgements: dict[str, Judgement] = {}
    for judge in judges:
        k = limits.get(judge.name, len(prompts))
        shown = questions if questions is not None and not isinstance(judge, ScalarJudge) else prompts
        flags = None if finished is None else (finished[0][:k], finished[1][:k])
        judgement = judge.compare(shown[:k], responses[:k], references[:k], flags)
        judgements[judge.name] = judgement
        summary = win_rate_summary(judgement.outcomes, resamples, seed)
        if lengths is not None:
            ours, theirs = lengths
            summary |= lc_win_rate_summary(judgement.outcomes, ours[:k], theirs[:k], resamples, seed)
        if judgement.scores is not None:
            summary |= {
                "reward": float(np.mean(judgement.scores)),
                "reference_reward": float(np.mean(judgement.reference_scores)),
            }
        if judgement.details:
            summary |= position_stats(judgement.details)
        metrics |= {f"{judge.name}/{key}": value for key, value in summary.items()}
    return metrics, judgements


def best_of(scores: np.ndarray, n: int) -> np.ndarray:
    """Per prompt (row), the index of the best of its first n samples (columns)."""
    return scores[:, :n].argmax(axis=1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, the analytic value used for best-of-n (Stiennon et
    al. 2020; an upper bound, Beirami et al. 2024)."""
    return float(np.log(n) - (n - 1) / n)


# ------------------------------------------------------------------------------------- presentation


def leaderboard_markdown(rows: list[dict], judges: list[str], identities: dict[str, dict]) -> str:
    """One row per model: each judge's win rate against the reference (a tie half) with its 95% interval
    and its length-controlled rate (LC, ties half too), the strict rate (ties none) for pairwise judges,
    mean scores, KL to the reference policy and length."""
    head = [
        "model",
        *[f"{j} win rate, ties ½ [95% CI]" for j in judges],
        *[f"{j} reward" for j in judges if f"{j}/reward" in rows[0]],
        "KL to SFT ± se",
        "mean tokens",
        "n",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"]]
        for j in judges:
            if f"{j}/win_rate" not in row:
                cells.append("–")
                continue
            low, high = row[f"{j}/win_rate_ci_low"], row[f"{j}/win_rate_ci_high"]
            cell = f"{row[f'{j}/win_rate']:.3f} [{low:.3f}, {high:.3f}]"
            if f"{j}/lc_win_rate" in row:
                cell += f"; LC {row[f'{j}/lc_win_rate']:.3f}"
            if identities[j].get("kind") == "pairwise_llm":
                cell += (
                    f"; strict {row[f'{j}/win_rate_strict']:.3f}; n {int(row[f'{j}/n'])}, "
                    f"{int(row[f'{j}/ties'])} ties, "
                    f"{int(row[f'{j}/invalid'])} invalid; consistency {row[f'{j}/consistency']:.2f}"
                )
            cells.append(cell)
        cells += [f"{row[f'{j}/reward']:.2f}" for j in judges if f"{j}/reward" in rows[0]]
        analytic = row.get("kind") == "best_of_n"  # log n - (n - 1) / n: no sampling error
        spread = " (analytic)" if analytic else f" ± {row['objective/kl_se']:.2f}"
        cells += [
            f"{row['objective/kl']:.2f}{spread}",
            f"{row['length/mean_tokens']:.1f}",
            str(int(row[f"{judges[0]}/n"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def frontier_figure(rows: list[dict], judge: str):
    """Mean reward against KL to SFT, the DPO paper's frontier: one point per policy, best-of-n as a
    curve over n."""
    from alignment.plots import plt

    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    policies = [r for r in rows if r.get("kind") != "best_of_n"]
    best = sorted((r for r in rows if r.get("kind") == "best_of_n"), key=lambda r: r["objective/kl"])
    if best:
        base = [r for r in policies if r["model"] == best[0]["policy"]]
        curve = base + best
        ax.plot(
            [r["objective/kl"] for r in curve],
            [r[f"{judge}/reward"] for r in curve],
            "s--",
            color="grey",
            label="best-of-n",
        )
    for r in policies:
        ax.errorbar(r["objective/kl"], r[f"{judge}/reward"], fmt="o", label=r["model"])
    ax.set(
        xlabel="KL(policy || SFT), nats",
        ylabel=f"mean {judge} reward",
        title=f"Reward-KL frontier ({judge} reward)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def win_rate_figure(rows: list[dict], judges: list[str]):
    """Win rate against the reference per model and judge, with 95% bootstrap intervals."""
    from alignment.plots import plt

    figure, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows) * len(judges)))
    labels, values, low, high = [], [], [], []
    for row in rows:
        for j in judges:
            if f"{j}/win_rate" in row:
                labels.append(f"{row['model']} · {j}")
                values.append(row[f"{j}/win_rate"])
                low.append(row[f"{j}/win_rate"] - row[f"{j}/win_rate_ci_low"])
                high.append(row[f"{j}/win_rate_ci_high"] - row[f"{j}/win_rate"])
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, xerr=[low, high], capsize=3, color="tab:blue", alpha=0.7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(
        xlim=(0, 1),
        xlabel="win rate against the reference response (95% CI)",
        title="Win rate vs gold references",
    )
    figure.tight_layout()
    return figure
