"""ppo: PPO-RLHF (Stiennon et al. 2020; Ouyang et al. 2022) from the SFT policy against the reward model,
with a critic, on the shared online loop (alignment/training/online.py) with the `PPO` method
(alignment/training/online_methods.py). Each rollout: sample one response per prompt, score it with the
RM (or, `reward: code`, with the functions of `rewards`), log-probs under policy and reference and the
critic's values (steps 1-3); per-token rewards -kl_coef x KL plus the score on the last token, GAE,
whitened advantages (step 4); `ppo_epochs` passes of the clipped policy and value losses (step 5); the KL
coefficient adapted to a target (step 6).

The critic (`critic_init`): a separate model initialised from the RM (default) or the SFT model with a
fresh head, or a value head on the policy's own transformer (`policy_head`); with `critic_lora`, that
model frozen in the run's dtype under a LoRA adapter, its value head trained in full. A LoRA critic from
the RM is also the RM: with its adapter off it scores the rollouts, so the two hold one copy of weights.
"""

from __future__ import annotations

import torch

from alignment.config import PPOConfig
from alignment.models.reward_model import RewardScorer, load_reward_model
from alignment.paths import Paths
from alignment.stages.common import (
    load_policy_and_reference,
    reward_model_path,
    reward_scorer,
    run_dtype,
    run_online,
    stage_reward,
)
from alignment.tracking import Tracker
from alignment.training.online_methods import PPO, ppo_settings

COLUMNS = [
    "step",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl",
    "objective/entropy",
    "policy/clipfrac_avg",
]
PANELS = [["objective/scores", "objective/rlhf_reward"], ["objective/kl"]]


class PolicyValueHead(torch.nn.Module):
    """The value head on the policy (critic_init: policy_head): a linear layer on the policy's own
    transformer, which the value loss then trains together with the policy loss. Zero-initialised,
    so every value starts at 0. Quacks like a reward model (`base_model`, `score`, a forward that runs
    both); `own_parameters` are the head's alone (the body is the policy's)."""

    def __init__(self, policy):
        super().__init__()
        self.base_model = policy.base_model  # shared, not copied
        self.score = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def own_parameters(self):
        return self.score.parameters()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden)


def build_critic(cfg: PPOConfig, policy, path, dtype: torch.dtype) -> torch.nn.Module:
    """The critic `critic_init` and `critic_lora` describe: a value head on the policy, a whole model
    (float32, trained in full), or a LoRA adapter and value head over the model at `path` frozen in
    `dtype`."""
    if cfg.critic_init == "policy_head":
        return PolicyValueHead(policy)
    if cfg.critic_lora is None:
        return load_reward_model(path)
    from alignment.models.lora import add_adapter

    return add_adapter(load_reward_model(path, dtype=dtype), cfg.critic_lora, cfg.train.seed)


def run(cfg: PPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)  # fresh weights (LoRA adapter, new critic head): the same every run
    dtype = run_dtype(cfg)
    tokenizer, policy, reference = load_policy_and_reference(paths.sft, cfg.lora, cfg.train.seed, dtype)
    critic_path = {"sft": paths.sft}.get(cfg.critic_init, cfg.critic_init)
    if cfg.critic_init == "reward_model":
        critic_path = reward_model_path(paths, cfg.reward_model)
    critic = build_critic(cfg, policy, critic_path, dtype)
    if cfg.critic_lora is not None and cfg.critic_init == "reward_model":
        from alignment.models.lora import AdapterDisabled  # peft: imported only for a LoRA critic

        # the RM is the critic with its adapter off: one copy of the weights for both
        shared = AdapterDisabled(critic)
        rm = RewardScorer(critic_path, cfg.max_length, cfg.compute.scoring_batch_size, dtype, shared)
    else:  # None without a reward model
        rm = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    reward = stage_reward(cfg, paths, rm)  # the RM, or a reward computed by code: a score per response
    critic_label = f"{cfg.critic_init}{' LoRA' if cfg.critic_lora else ''}"
    metrics = run_online(
        "ppo",
        cfg,
        paths,
        log,
        PPO(cfg),
        ppo_settings(cfg),
        reward,
        rm,
        critic=critic,
        policy_and_reference=(tokenizer, policy, reference),
        columns=COLUMNS,
        panels=PANELS,
        label=f"PPO (kl_coef {cfg.kl_coef}{' adaptive' if cfg.kl_target else ''}, critic {critic_label})",
    )
    return metrics
