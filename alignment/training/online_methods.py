"""PPO, GRPO and RLOO as methods of the one online loop (alignment/training/online.py): each is its step 4
(advantages from the batch's scores) and step 5 (the loss of a minibatch), calls to the pure functions of
alignment/losses/. The loop does the rest: sampling, scoring, log-probs, minibatches, several processes,
checkpoints.
"""

from __future__ import annotations

import torch

from alignment.config import GRPOConfig, PPOConfig, RLOOConfig
from alignment.losses.group_rl_loss import (
    group_zero_std,
    grpo_advantages,
    grpo_loss,
    kl_folded_rewards,
    rloo_advantages,
    rloo_loss,
    sequence_kl,
)
from alignment.losses.ppo_loss import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from alignment.training.online import LoopSettings, OnlineMethod, Outputs, Rollout


class PPO(OnlineMethod):
    """PPO-RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): per-token KL penalty
    towards the reference, the score on the last token, GAE with the critic's values, whitened advantages,
    clipped policy and value losses; the KL coefficient fixed or adapted to a target (step 6)."""

    uses_reference = True
    loss_units = "tokens"

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.kl_control = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.kl_target
            else FixedKLController(cfg.kl_coef)
        )

    def advantages(self, rollout: Rollout) -> None:
        cfg, mask, scores = self.cfg, rollout.mask, rollout.scores
        # penalise responses cut off without EOS
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(rollout.finished, scores, scores - cfg.missing_eos_penalty)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        # step 4a. per-token rewards: -kl_coef * KL estimate, plus the score on the last response token
        rewards, non_score_rewards, kl = kl_penalized_rewards(
            scores, rollout.old_logps, rollout.reference_logps, mask, self.kl_control.value, cfg.kl_estimator
        )
        # step 4b. advantages by GAE, whitened over the response tokens of the whole batch (every process's)
        advantages, rollout.returns = gae(rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
        rollout.advantages = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages
        rollout.stats |= {
            "objective/kl": (kl * mask).sum(-1).mean().item(),
            "objective/non_score_reward": non_score_rewards.sum(-1).mean().item(),
            "objective/scores": scores.mean().item(),
            # TRL's: the sampled tokens' negative log-probs summed per response, the batch mean
            "objective/entropy": -(rollout.old_logps * mask).sum(-1).mean().item(),
            "objective/rlhf_reward": (scores + non_score_rewards.sum(-1)).mean().item(),
            "val/num_eos_tokens": int(rollout.finished.sum()),
            "response_length": mask.sum(-1).mean().item(),
            "kl_coef": self.kl_control.value,
        }

    def loss(self, outputs: Outputs, rows: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        pg_loss, pg_stats = ppo_policy_loss(
            outputs.logps, rows.old_logps, rows.advantages, rows.mask, cfg.clip_range
        )
        vf_loss, vf_stats = ppo_value_loss(
            outputs.values, rows.old_values, rows.returns, rows.mask, cfg.clip_range_value
        )
        stats = {
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "loss/policy_avg": pg_loss.item(),
            "loss/value_avg": vf_loss.item(),
            "val/clipfrac_avg": vf_stats["clipfrac"],
        }
        return pg_loss + cfg.vf_coef * vf_loss, stats

    def after_batch(self, rollout: Rollout, num_samples: int) -> None:
        # step 6. adapt the KL coefficient to the batch's KL (over all processes' samples)
        self.kl_control.update(rollout.stats["objective/kl"], num_samples)

    def state_dict(self) -> dict:
        return self.kl_control.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.kl_control.load_state_dict(state)


def ppo_settings(cfg: PPOConfig) -> LoopSettings:
    return LoopSettings(
        train=cfg.train,
        batches=cfg.rollouts,
        prompts_per_batch=cfg.rollout_batch_size,
        samples_per_prompt=1,
        passes=cfg.ppo_epochs,
        minibatch_size=cfg.minibatch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        critic_learning_rate=cfg.train.critic_learning_rate,
        generation_batch_size=cfg.compute.generation_batch_size,
        scoring_batch_size=cfg.compute.scoring_batch_size,
    )


def group_settings(cfg: GRPOConfig | RLOOConfig) -> LoopSettings:
    return LoopSettings(
        train=cfg.train,
        batches=cfg.batches,
        prompts_per_batch=cfg.prompts_per_batch,
        samples_per_prompt=cfg.samples_per_prompt,
        passes=cfg.num_iterations,
        minibatch_size=cfg.minibatch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        generation_batch_size=cfg.compute.generation_batch_size,
        scoring_batch_size=cfg.compute.scoring_batch_size,
    )


def group_statistics(rollout: Rollout, k: int, kl: torch.Tensor | None) -> dict[str, float]:
    """TRL's group statistics of a batch: mean reward, the mean of the groups' reward std, the fraction of
    groups with equal rewards (no signal), and the mean k1 KL(policy || SFT) of a sample."""
    groups = rollout.scores.view(-1, k)
    stats = {
        "reward": groups.mean().item(),
        "reward_std": groups.std(dim=1).mean().item(),
        "frac_reward_zero_std": group_zero_std(groups).float().mean().item(),
    }
    if kl is not None:
        stats["objective/kl"] = kl.mean().item()
    return stats


class GRPO(OnlineMethod):
    """GRPO (Shao et al. 2024): advantages (r - mean) / (std + eps) per group of k, the per-token clipped
    surrogate plus beta x k3 KL as a loss term, averaged by `loss_type`; as TRL's GRPOTrainer."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.uses_reference = cfg.beta > 0
        # what the loss averages over: tokens of the minibatch (bnpo, dapo), or completions (grpo's mean of
        # token means, dr_grpo's sum over B x max_new_tokens)
        self.loss_units = "tokens" if cfg.loss_type in ("bnpo", "dapo") else "completions"

    def advantages(self, rollout: Rollout) -> None:
        k = self.cfg.samples_per_prompt
        kl = None
        if rollout.reference_logps is not None:
            kl = sequence_kl(rollout.old_logps, rollout.reference_logps, rollout.mask)
        rollout.advantages = grpo_advantages(rollout.scores.view(-1, k), self.cfg.scale_rewards)[0].flatten()
        rollout.stats |= group_statistics(rollout, k, kl)

    def loss(self, outputs: Outputs, rows: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        return grpo_loss(
            outputs.logps,
            rows.old_logps,
            rows.reference_logps,
            rows.advantages,
            rows.mask,
            cfg.beta,
            cfg.epsilon,
            cfg.epsilon_high,
            cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
        )


class RLOO(OnlineMethod):
    """RLOO (Ahmadian et al. 2024): the leave-one-out baseline, R = r - beta KL folded into the reward (or
    beta x k3 as a loss term), the clipped surrogate on the sequence ratio; as TRL's RLOOTrainer."""

    loss_units = "completions"

    def __init__(self, cfg: RLOOConfig):
        self.cfg = cfg
        self.uses_reference = cfg.beta > 0

    def advantages(self, rollout: Rollout) -> None:
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        kl = None
        if rollout.reference_logps is not None:
            kl = sequence_kl(rollout.old_logps, rollout.reference_logps, rollout.mask)
        groups = rollout.scores.view(-1, k)
        if cfg.kl_in_reward and kl is not None:
            groups = kl_folded_rewards(groups, kl.view(-1, k), cfg.beta)
        rollout.advantages = rloo_advantages(groups).flatten()
        rollout.stats |= group_statistics(rollout, k, kl)

    def loss(self, outputs: Outputs, rows: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        return rloo_loss(
            outputs.logps,
            rows.old_logps,
            rows.advantages,
            rows.mask,
            cfg.epsilon,
            cfg.epsilon_high,
            rows.reference_logps,
            cfg.beta,
            cfg.kl_in_reward,
        )
