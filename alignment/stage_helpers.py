"""What the policy stages repeat, written once: the policy with its frozen reference and tokenizer, the
reward model a params key names, the held-out judges and the comparison with SFT on held-out prompts.
(The end of every stage is `alignment.results.finish`: a stage that loads no policy does not depend on
this module's model code.)"""

from __future__ import annotations

import logging
from pathlib import Path

from alignment.data import write_jsonl
from alignment.paths import Paths

logger = logging.getLogger(__name__)


def load_policy_and_reference(path: Path):
    """(tokenizer, policy, reference): two copies of the model at `path`, the reference frozen in eval
    mode (no dropout, no gradients)."""
    from alignment.models import load_causal_lm, load_tokenizer

    reference = load_causal_lm(path).eval().requires_grad_(False)
    return load_tokenizer(path), load_causal_lm(path), reference


def reward_model_path(paths: Paths, name: str) -> Path:
    """`rm`: the pipeline's reward model; anything else a path (relative to the project root) or hub id."""
    return paths.rm if name == "rm" else paths.resolve(name)


def reward_scorer(paths: Paths, name: str, max_length: int):
    from alignment.reward import RewardScorer

    return RewardScorer(reward_model_path(paths, name), max_length=max_length)


def held_out_judges(paths: Paths, reward) -> dict:
    """The judges every policy stage compares with SFT by: the gold scorer (the held-out judge of the IMDb
    task, which nothing trains against) on prompt + response, and the reward model (the proxy)."""
    from alignment.gold import GoldScorer

    gold = GoldScorer.load(paths.gold)
    return {
        "gold": lambda p, r: gold.reward([a + b for a, b in zip(p, r)]),
        "rm": lambda p, r: reward(p, r).numpy(),
    }


def compare_on_held_out(
    policy,
    reference,
    tokenizer,
    paths: Paths,
    cfg,
    reward,
    seed: int,
    split: str = "test",
    out: Path | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Policy vs SFT on `cfg.eval_prompts` prompts of `split` (`cfg.source`), judged by gold and the RM;
    the per-prompt rows go to `out/held_out_generations.jsonl` when `out` is given."""
    from alignment.heldout import compare_to_sft
    from alignment.prompts import load_prompts

    prompts = load_prompts(paths, split, cfg.source, cfg.eval_prompts)
    metrics, rows = compare_to_sft(
        policy, reference, tokenizer, prompts, cfg.samples, seed, held_out_judges(paths, reward)
    )
    if out is not None:
        write_jsonl(out / "held_out_generations.jsonl", rows)
    return metrics, rows


def log_held_out(name: str, metrics: dict[str, float]) -> None:
    logger.info(
        "held-out: gold reward %s %.3f vs SFT %.3f (win rate %.2f), RM win rate %.2f, KL %.2f nats",
        name,
        metrics["gold/reward"],
        metrics["gold/sft_reward"],
        metrics["gold/win_rate_vs_sft"],
        metrics["rm/win_rate_vs_sft"],
        metrics["objective/kl"],
    )
