"""rloo: RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019) from the SFT policy: k samples per
prompt, the mean reward of the other k - 1 as each one's baseline instead of a critic; semantics as TRL's
RLOOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     the gold scorer, or functions of code, `rewards`) and the RM for the held-out comparison.
  2. Generation batches on the shared online loop (alignment/training/online.py) with the `RLOO` method
     (alignment/training/online_methods.py): the reward R = r - beta KL (k1, summed over the sample;
     `kl_in_reward`) and the leave-one-out advantages; `num_iterations` passes of `rloo_loss`, the
     clipped surrogate on the sequence's probability ratio.
  3. The policy saved, and compared with SFT on held-out prompts (gold, the RM, the code rewards).
  4. Metrics, plots/rloo/train.csv, the curves in MLflow; registered as `alignment-rloo`.
"""

from __future__ import annotations

from alignment.config import RLOOConfig
from alignment.paths import Paths
from alignment.stages.common import GROUP_COLUMNS, GROUP_PANELS, reward_scorer, run_online, stage_reward
from alignment.tracking import Tracker
from alignment.training.online_methods import RLOO, group_settings


def run(cfg: RLOOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    kl = "in the reward" if cfg.kl_in_reward else "as a loss term"
    return run_online(
        "rloo",
        cfg,
        paths,
        log,
        RLOO(cfg),
        group_settings(cfg),
        stage_reward(cfg, paths, rm),
        rm,
        columns=GROUP_COLUMNS,
        panels=GROUP_PANELS,
        label=f"RLOO (beta {cfg.beta} {kl})",
    )
