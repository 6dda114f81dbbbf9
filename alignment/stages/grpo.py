"""grpo: GRPO (Shao et al. 2024, DeepSeekMath) from the SFT policy: k samples per prompt, the group's mean
and std as the baseline instead of a critic; semantics as TRL's GRPOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     or the gold scorer) and the RM for the held-out comparison.
  2. Generation batches (alignment/group_rl.py): k samples per prompt, scored; advantages
     (r - mean) / (std + eps) per group (`grpo_advantages`); `num_iterations` passes of `grpo_loss`, the
     per-token clipped surrogate plus beta x k3 KL, averaged by `loss_type`.
  3. The policy saved, and compared with SFT on held-out prompts (gold and the RM).
  4. Metrics, plots/grpo/train.csv, the curves in MLflow; registered as `alignment-grpo`.
"""

from __future__ import annotations

import logging

from alignment import group_rl
from alignment.config import GRPOConfig
from alignment.group_rl_loss import grpo_advantages, grpo_loss
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


def method(cfg: GRPOConfig) -> group_rl.Method:
    def advantages(scores, kl):  # the KL is a loss term in GRPO, not part of the reward
        return grpo_advantages(scores, cfg.scale_rewards)[0]

    def loss(logps, old_logps, reference_logps, advantages, mask):
        return grpo_loss(
            logps,
            old_logps,
            reference_logps,
            advantages,
            mask,
            cfg.beta,
            cfg.epsilon,
            cfg.epsilon_high,
            cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
        )

    return group_rl.Method(advantages, loss)


def run(cfg: GRPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    # step 1. policy, reference, rewards
    tokenizer, policy, reference = load_policy_and_reference(paths.sft)
    check_max_length(cfg.max_length, policy, "grpo.max_length")
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length)
    device = group_rl.device(cfg.train)
    policy, reference = policy.to(device), reference.to(device)
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts)
    logger.info(
        "GRPO: %d batches of %d prompts x %d samples, %d iteration(s), beta %g, loss %s, reward %s",
        cfg.batches,
        cfg.prompts_per_batch,
        cfg.samples_per_prompt,
        cfg.num_iterations,
        cfg.beta,
        cfg.loss_type,
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
        paths.checkpoints("grpo"),
        fingerprint("grpo", cfg, paths.root),
        log.metrics if log else None,
        desc="grpo",
    )

    # step 3. save, then policy vs SFT on held-out prompts
    out = paths.out("grpo")
    save_pretrained(policy, tokenizer, out)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, rm, cfg.train.seed, out=out
    )
    log_held_out("GRPO", held_out)

    # step 4. metrics, plots, registration
    return finish(
        "grpo",
        paths,
        log,
        group_rl.summary(history, timing) | held_out,
        csvs={"train.csv": (history, group_rl.CSV_COLUMNS)},
        curves=(held_out, len(history)),
        figures={"plots/grpo.png": group_rl.curves(history, "GRPO")},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )
