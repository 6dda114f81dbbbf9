"""grpo: GRPO (Shao et al. 2024, DeepSeekMath) from the SFT policy: k samples per prompt, the group's mean
and std as the baseline instead of a critic; semantics as TRL's GRPOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     or the gold scorer) and the RM for the held-out comparison.
  2. Generation batches (alignment/training/online.py): k samples per prompt, scored; advantages
     (r - mean) / (std + eps) per group (`grpo_advantages`); `num_iterations` passes of `grpo_loss`, the
     per-token clipped surrogate plus beta x k3 KL, averaged by `loss_type`.
  3. The policy saved, and compared with SFT on held-out prompts (gold and the RM).
  4. Metrics, plots/grpo/train.csv, the curves in MLflow; registered as `alignment-grpo`.
"""

from __future__ import annotations

from alignment.config import GRPOConfig
from alignment.losses.group_rl_loss import grpo_advantages, grpo_loss
from alignment.paths import Paths
from alignment.tracking import Tracker
from alignment.training import online as group_rl


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
    return group_rl.run_stage("grpo", cfg, paths, log, method(cfg), f"beta {cfg.beta}, loss {cfg.loss_type}")
