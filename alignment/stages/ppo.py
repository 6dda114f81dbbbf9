"""ppo: PPO-RLHF (Stiennon et al. 2020; Ouyang et al. 2022) from the SFT policy against the reward
model, with a separate critic. Each rollout is six numbered steps, each a call to a pure function of
alignment/ppo_loss.py or a model forward pass. Every tensor of a rollout lives on the shifted token
grid of `token_logps`: column j is the token at position j + 1, and `mask` marks response tokens.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment import checkpoint
from alignment.batching import collate
from alignment.config import PPOConfig
from alignment.generation import decode_responses, ended, generate_ids
from alignment.heldout import evaluating
from alignment.losses import IGNORE_INDEX, token_logps
from alignment.models import check_max_length
from alignment.paths import Paths
from alignment.plots import plt
from alignment.ppo_loss import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    masked_entropy,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from alignment.prompts import load_prompts
from alignment.registry import fingerprint as registry_fingerprint
from alignment.results import finish
from alignment.reward import RewardScorer, load_reward_model
from alignment.stage_helpers import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_model_path,
    save_model,
)
from alignment.tracking import Tracker
from alignment.trainer import window_indices

logger = logging.getLogger(__name__)


class PolicyValueHead(torch.nn.Module):
    """The value head on the policy (critic_init: policy_head): a linear layer on the policy's own
    transformer, which the value loss then trains together with the policy loss. Zero-initialised,
    so every value starts at 0. Quacks like a reward model (`base_model`, `score`)."""

    def __init__(self, policy):
        super().__init__()
        self.base_model = policy.base_model  # shared, not copied
        self.score = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def own_parameters(self):
        return self.score.parameters()


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) value of each state: the critic's scalar head at position j values token j + 1."""
    hidden = critic.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return critic.score(hidden).squeeze(-1).float()[:, :-1]


def policy_logps(
    policy, batch: dict[str, torch.Tensor], temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, T - 1) at the sampling temperature, the response mask, and the logits."""
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
    logps, mask = token_logps(logits, batch["labels"])
    return logps, mask, logits[:, :-1]


class Rollout:
    """A batch of responses with everything PPO's optimisation needs, computed once (steps 1-4)."""

    def __init__(self, batch, mask, old_logps, old_values, advantages, returns, stats):
        self.batch, self.mask, self.old_logps, self.old_values = batch, mask, old_logps, old_values
        self.advantages, self.returns, self.stats = advantages, returns, stats


@torch.no_grad()
def rollout(
    policy,
    reference,
    critic,
    reward: RewardScorer,
    tokenizer,
    prompts: list[str],
    cfg: PPOConfig,
    kl_coef: float,
    seed: int,
) -> Rollout:
    # step 1. sample one response per prompt from the policy (its own RNG stream: resumable)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        drawn = generate_ids(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature)
    pad = collate(tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    batch = {
        k: v.to(device)
        for k, v in pad(
            [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in drawn]
        ).items()
    }
    # the rollout's log-probs and values with dropout off, as the sampler drew (the reference is frozen)
    with evaluating(policy, critic):
        logps, mask, _ = policy_logps(policy, batch, cfg.temperature)
        values = critic_values(critic, batch["input_ids"], batch["attention_mask"])
    reference_logps, _, _ = policy_logps(reference, batch, cfg.temperature)

    # step 2. score each prompt + response with the reward model; penalise responses cut off without EOS
    finished = ended(tokenizer, drawn)
    scores = reward(prompts, decode_responses(tokenizer, drawn), finished).float().to(device)
    has_eos = torch.tensor(finished, device=device)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

    # step 3. per-token rewards: -kl_coef * KL estimate, plus the score on the last real response token
    rewards, non_score_rewards, kl = kl_penalized_rewards(
        scores, logps, reference_logps, mask, kl_coef, cfg.kl_estimator
    )

    # step 4. advantages by GAE, whitened over the batch's response tokens
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    stats = {
        "objective/kl": (kl * mask).sum(-1).mean().item(),
        "objective/non_score_reward": non_score_rewards.sum(-1).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores + non_score_rewards.sum(-1)).mean().item(),
        "val/num_eos_tokens": int(has_eos.sum()),
        "response_length": mask.sum(-1).mean().item(),
        "kl_coef": kl_coef,
    }
    return Rollout(batch, mask, logps, values, advantages, returns, stats)


def optimise(policy, critic, optimizers, data: Rollout, cfg: PPOConfig, seed: int) -> dict[str, float]:
    """Step 5. PPO epochs over minibatches: clipped policy loss + vf_coef x clipped value loss."""
    size = data.mask.shape[0]
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {}
    # a shared transformer (value head on the policy) is counted once in the norm
    parameters = list({id(p): p for model in (policy, critic) for p in model.parameters()}.values())
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, cfg.minibatch_size):
            rows = order[start : start + cfg.minibatch_size]
            batch = {k: v[rows] for k, v in data.batch.items()}
            mask = data.mask[rows]
            logps, _, logits = policy_logps(policy, batch, cfg.temperature)
            pg_loss, pg_stats = ppo_policy_loss(
                logps, data.old_logps[rows], data.advantages[rows], mask, cfg.clip_range
            )
            values = critic_values(critic, batch["input_ids"], batch["attention_mask"])
            vf_loss, vf_stats = ppo_value_loss(
                values, data.old_values[rows], data.returns[rows], mask, cfg.clip_range_value
            )
            (pg_loss + cfg.vf_coef * vf_loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.train.max_grad_norm or float("inf"))
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                entropy = masked_entropy(logits, mask).mean().item()
            for key, value in {
                "policy/approxkl_avg": pg_stats["approxkl"],
                "policy/clipfrac_avg": pg_stats["clipfrac"],
                "loss/policy_avg": pg_loss.item(),
                "loss/value_avg": vf_loss.item(),
                "val/clipfrac_avg": vf_stats["clipfrac"],
                "objective/entropy": entropy,
                "grad_norm": float(grad_norm),
            }.items():
                totals.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in totals.items()}


def save_checkpoint(
    path: Path, fingerprint: str, done: int, policy, critic, optimizers, kl_control, history
) -> None:
    """policy, critic, optimizers, KL controller and RNG states in step_<done>/state.pt (weights_only-safe);
    the rollout count and the curves in its meta."""
    state = {
        "policy": policy.state_dict(),
        "critic": critic.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "kl_control": kl_control.state_dict(),
    }
    checkpoint.save_state(path, done, fingerprint, state, {"history": history})


def load_checkpoint(path: Path, fingerprint: str, policy, critic, optimizers, kl_control) -> tuple[int, list]:
    found = checkpoint.load_state(path, fingerprint)
    if found is None:
        return 0, []
    step, state, meta = found
    policy.load_state_dict(state["policy"])
    critic.load_state_dict(state["critic"])
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    kl_control.load_state_dict(state["kl_control"])
    return step, meta["history"]


def train_ppo(
    policy,
    reference,
    critic,
    reward: RewardScorer,
    tokenizer,
    prompts: list[str],
    cfg: PPOConfig,
    checkpoint_dir: Path | None,
    fingerprint: str,
    log_metrics=None,
) -> tuple[list[dict], dict[str, float]]:
    """The outer loop: rollouts 1..cfg.rollouts, each steps 1-5, then step 6 (the KL controller)."""
    optimizers = [
        torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate, weight_decay=0.0),
        torch.optim.AdamW(
            critic.own_parameters() if isinstance(critic, PolicyValueHead) else critic.parameters(),
            lr=cfg.train.critic_learning_rate,
            weight_decay=0.0,
        ),
    ]
    kl_control = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target
        else FixedKLController(cfg.kl_coef)
    )
    done, history = 0, []
    if checkpoint_dir is not None and cfg.train.resume:
        done, history = load_checkpoint(checkpoint_dir, fingerprint, policy, critic, optimizers, kl_control)
    windows = len(window_indices(len(prompts), cfg.rollout_batch_size, 1, cfg.train.seed, 0))
    if windows == 0:
        raise ValueError(f"{len(prompts)} prompts are fewer than one rollout of {cfg.rollout_batch_size}")
    timing = {"generation_seconds": 0.0, "training_seconds": 0.0}
    policy.train()
    critic.train()
    for k in tqdm(
        range(done, cfg.rollouts),
        initial=done,
        total=cfg.rollouts,
        desc="ppo",
        unit="rollout",
        mininterval=2.0,
    ):
        epoch, position = divmod(k, windows)
        rows = window_indices(len(prompts), cfg.rollout_batch_size, 1, cfg.train.seed, epoch)[position]
        started = time.perf_counter()
        data = rollout(
            policy,
            reference,
            critic,
            reward,
            tokenizer,
            [prompts[i] for i in rows],
            cfg,
            kl_control.value,
            seed=cfg.train.seed * 1_000_003 + k,
        )
        middle = time.perf_counter()
        stats = optimise(policy, critic, optimizers, data, cfg, seed=cfg.train.seed * 1_000_003 + k)
        # step 6. adapt the KL coefficient to the rollout's KL
        kl_control.update(data.stats["objective/kl"], cfg.rollout_batch_size)
        timing["generation_seconds"] += middle - started
        timing["training_seconds"] += time.perf_counter() - middle
        row = {"step": k + 1, **data.stats, **stats}
        history.append(row)
        if log_metrics:
            log_metrics({key: value for key, value in row.items() if key != "step"}, k + 1)
        if (
            checkpoint_dir is not None
            and cfg.train.checkpoint_every
            and (k + 1) % cfg.train.checkpoint_every == 0
        ):
            save_checkpoint(
                checkpoint_dir, fingerprint, k + 1, policy, critic, optimizers, kl_control, history
            )
    return history, timing


def curves(history: list[dict]):
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in history]
    for key in ("objective/scores", "objective/rlhf_reward"):
        axes[0].plot(steps, [r[key] for r in history], label=key)
    axes[1].plot(steps, [r["objective/kl"] for r in history], label="objective/kl")
    for ax in axes:
        ax.set(xlabel="rollout")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("PPO: RM score and KL to SFT per rollout")
    figure.tight_layout()
    return figure


def run(cfg: PPOConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    tokenizer, policy, reference = load_policy_and_reference(paths.sft, cfg.lora)
    check_max_length(cfg.max_length, policy, "ppo.max_length")
    reward_path = reward_model_path(paths, cfg.reward_model)
    reward = RewardScorer(reward_path, max_length=cfg.max_length)
    critic_path = {"reward_model": reward_path, "sft": paths.sft}.get(cfg.critic_init, cfg.critic_init)
    critic = PolicyValueHead(policy) if cfg.critic_init == "policy_head" else load_reward_model(critic_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, reference, critic = policy.to(device), reference.to(device), critic.to(device)
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    fingerprint = registry_fingerprint("ppo", cfg, paths.root)
    logger.info(
        "PPO: %d rollouts of %d prompts, kl_coef %g (%s), critic from %s",
        cfg.rollouts,
        cfg.rollout_batch_size,
        cfg.kl_coef,
        "adaptive" if cfg.kl_target else "fixed",
        critic_path,
    )
    history, timing = train_ppo(
        policy,
        reference,
        critic,
        reward,
        tokenizer,
        prompts,
        cfg,
        paths.checkpoints("ppo"),
        fingerprint,
        log.metrics if log else None,
    )
    out = paths.out("ppo")
    save_model(policy, tokenizer, out, cfg.lora)

    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, reward, cfg.train.seed, out=out
    )
    log_held_out("PPO", held_out)
    logger.info(
        "generation %.0f s, training %.0f s", timing["generation_seconds"], timing["training_seconds"]
    )
    last = history[-1]
    metrics = (
        {f"train/{k}": v for k, v in last.items() if k != "step"}
        | held_out
        | timing
        | {"rollouts": len(history)}
    )
    columns = [
        "step",
        "objective/scores",
        "objective/rlhf_reward",
        "objective/kl",
        "objective/entropy",
        "policy/clipfrac_avg",
    ]
    return finish(
        "ppo",
        paths,
        log,
        metrics,
        csvs={"train.csv": (history, columns)},
        curves=(held_out, len(history)),
        figures={"plots/ppo.png": curves(history)},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )
