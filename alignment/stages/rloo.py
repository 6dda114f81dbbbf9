"""rloo: RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019) from the SFT policy: k samples per
prompt, the mean reward of the other k - 1 as each one's baseline instead of a critic; semantics as TRL's
RLOOTrainer.

  1. The policy and its frozen SFT reference; the reward the samples are trained on (`reward`: the RM,
     or the gold scorer) and the RM for the held-out comparison.
  2. Generation batches (alignment/training/online.py): k samples per prompt, scored; the reward
     R = r - beta KL (k1, summed over the sample; `kl_in_reward`) and the leave-one-out advantages
     (`rloo_advantages`); `num_iterations` passes of `rloo_loss`, the clipped surrogate on the sequence's
     probability ratio.
  3. The policy saved, and compared with SFT on held-out prompts (gold and the RM).
  4. Metrics, plots/rloo/train.csv, the curves in MLflow; registered as `alignment-rloo`.
"""

from __future__ import annotations

from alignment.config import RLOOConfig
from alignment.losses.group_rl_loss import kl_folded_rewards, rloo_advantages, rloo_loss
from alignment.paths import Paths
from alignment.tracking import Tracker
from alignment.training import online as group_rl


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
    return group_rl.run_stage(
        "rloo",
        cfg,
        paths,
        log,
        method(cfg),
        f"beta {cfg.beta} " + ("in the reward" if cfg.kl_in_reward else "as a loss term"),
    )
