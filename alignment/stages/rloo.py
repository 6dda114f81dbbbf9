"""rloo: RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019) from the SFT policy: k samples per
prompt, the mean reward of the other k - 1 as each one's baseline instead of a critic; semantics as TRL's
RLOOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     or the gold scorer) and the RM for the held-out comparison.
  2. Generation batches (alignment/group_rl.py): k samples per prompt, scored; the reward
     R = r - beta KL (k1, summed over the sample; `kl_in_reward`) and the leave-one-out advantages
     (`rloo_advantages`); `num_iterations` passes of `rloo_loss`, the clipped surrogate on the sequence's
     probability ratio.
  3. The policy saved, and compared with SFT on held-out prompts (gold and the RM).
  4. Metrics, plots/rloo/train.csv, the curves in MLflow; registered as `alignment-rloo`.
"""

from __future__ import annotations

import logging

from alignment import group_rl
from alignment.config import RLOOConfig
from alignment.group_rl_loss import kl_folded_rewards, rloo_advantages, rloo_loss
from alignment.models import check_max_length, save_pretrained
from alignment.paths import Paths
from alignment.prompts import load_prompts
from alignment.registry import fingerprint
from alignment.results import finish
from alignment.stage_helpers import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_scorer,
)
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)


def method(cfg: RLOOConfig) -> group_rl.Method:
    def advantages(scores, kl):
        folded = cfg.kl_in_reward and kl is not None
        return rloo_advantages(kl_folded_rewards(scores, kl, cfg.beta) if folded else scores)

    def loss(logps, old_logps, reference_logps, advantages, mask):
        return rloo_loss(
            logps,
            old_logps,
            advantages,
            mask,
            cfg.epsilon,
            cfg.epsilon_high,
            reference_logps,
            cfg.beta,
            cfg.kl_in_reward,
        )

    return group_rl.Method(advantages, loss)


def run(cfg: RLOOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    # step 1. policy, reference, rewards
    tokenizer, policy, reference = load_policy_and_reference(paths.sft)
    check_max_length(cfg.max_length, policy, "rloo.max_length")
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length)
    device = group_rl.device(cfg.train)
    policy, reference = policy.to(device), reference.to(device)
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts)
    logger.info(
        "RLOO: %d batches of %d prompts x %d samples, %d iteration(s), beta %g (%s), reward %s",
        cfg.batches,
        cfg.prompts_per_batch,
        cfg.samples_per_prompt,
        cfg.num_iterations,
        cfg.beta,
        "in the reward" if cfg.kl_in_reward else "a loss term",
        cfg.reward,
    )

    # step 2. generation batches
    history, timing = group_rl.train(
        policy,
        reference,
        group_rl.reward_function(cfg, paths, rm),
        tokenizer,
        prompts,
        cfg,
        method(cfg),
        paths.checkpoints("rloo"),
        fingerprint("rloo", cfg, paths.root),
        log.metrics if log else None,
        desc="rloo",
    )

    # step 3. save, then policy vs SFT on held-out prompts
    out = paths.out("rloo")
    save_pretrained(policy, tokenizer, out)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, rm, cfg.train.seed, out=out
    )
    log_held_out("RLOO", held_out)

    # step 4. metrics, plots, registration
    return finish(
        "rloo",
        paths,
        log,
        group_rl.summary(history, timing) | held_out,
        csvs={"train.csv": (history, group_rl.CSV_COLUMNS)},
        curves=(held_out, len(history)),
        figures={"plots/rloo.png": group_rl.curves(history, "RLOO")},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )
