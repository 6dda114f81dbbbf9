"""grpo: GRPO (Shao et al. 2024, DeepSeekMath) from the SFT policy: k samples per prompt, the group's mean
and std as the baseline instead of a critic; semantics as TRL's GRPOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     the gold scorer, or functions of code, `rewards`) and the RM for the held-out comparison.
  2. Generation batches on the shared online loop (alignment/training/online.py) with the `GRPO` method
     (alignment/training/online_methods.py): advantages (r - mean) / (std + eps) per group;
     `num_iterations` passes of `grpo_loss`, the per-token clipped surrogate plus beta x k3 KL, averaged
     by `loss_type`.
  3. The policy saved, and compared with SFT on held-out prompts (gold, the RM, the code rewards).
  4. Metrics, plots/grpo/train.csv, the curves in MLflow; registered as `alignment-grpo`.
"""

from __future__ import annotations

from alignment.config import GRPOConfig
from alignment.paths import Paths
from alignment.stages.common import GROUP_COLUMNS, GROUP_PANELS, reward_scorer, run_online, stage_reward
from alignment.tracking import Tracker
from alignment.training.online_methods import GRPO, group_settings


def run(cfg: GRPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    return run_online(
        "grpo",
        cfg,
        paths,
        log,
        GRPO(cfg),
        group_settings(cfg),
        stage_reward(cfg, paths, rm),
        rm,
        columns=GROUP_COLUMNS,
        panels=GROUP_PANELS,
        label=f"GRPO (beta {cfg.beta}, loss {cfg.loss_type})",
    )
