"""ppo: PPO-RLHF (Stiennon et al. 2020; Ouyang et al. 2022) from the SFT policy against the reward
model, with a separate critic. Each rollout is six numbered steps, each a call to a pure function of
alignment/losses/ppo_loss.py or a model forward pass. Every tensor of a rollout lives on the shifted token
grid of `token_logps`: column j is the token at position j + 1, and `mask` marks response tokens.

Several processes (torchrun, accelerate): `rollout_batch_size` and `minibatch_size` are per process, so
N processes with r / N and m / N make the updates of one with r and m. Rollout k's prompts are a window
drawn from (seed, k); each process samples and scores its block of them, every sample from a seed of
(seed, k, prompt), and all gather the whole rollout. Every process then holds the same rollout (advantages
whitened over all of its tokens) and trains on its block of each minibatch of one global permutation.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from alignment.config import PPOConfig
from alignment.data.batching import as_example, collate
from alignment.data.prompts import load_prompts
from alignment.evaluation.heldout import evaluating
from alignment.losses.logprobs import IGNORE_INDEX, token_logps
from alignment.losses.ppo_loss import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    masked_entropy,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.loading import check_max_length
from alignment.models.reward_model import RewardScorer, load_reward_model, token_scores
from alignment.paths import Paths
from alignment.plots import plt
from alignment.stages.common import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_model_path,
    save_model,
)
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training import checkpoint, distributed
from alignment.training.checkpoint import fingerprint as checkpoint_fingerprint
from alignment.training.trainer import make_optimizer, prepare_model, window_indices

logger = logging.getLogger(__name__)


class PolicyValueHead(torch.nn.Module):
    """The value head on the policy (critic_init: policy_head): a linear layer on the policy's own
    transformer, which the value loss then trains together with the policy loss. Zero-initialised,
    so every value starts at 0. Quacks like a reward model (`base_model`, `score`, a forward that runs
    both)."""

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


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) value of each state: the critic's scalar head at position j values token j + 1."""
    return token_scores(critic, input_ids, attention_mask)[:, :-1]


class ActorCritic(torch.nn.Module):
    """Policy and critic as the one module that accelerate prepares (DDP under several processes): one
    forward gives the policy's logits (B, T, V) and the critic's values (B, T - 1), and one set of
    gradient hooks syncs both, the transformer they share under critic_init policy_head counted once
    (two DDP wrappers over shared weights would each reduce them)."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits, critic_values(self.critic, input_ids, attention_mask)


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
def experience(
    policy, reference, critic, reward: RewardScorer, tokenizer, prompts: list[str], cfg: PPOConfig, seed: int
) -> list[dict]:
    """Steps 1-2 for one process's prompts. Per prompt: its sample (`as_example`), the sampled tokens'
    log-probs under policy and reference and the critic's values, on the sample's own columns of the
    shifted grid (its length - 1), its score and whether it ended with EOS; on the CPU, for `gather`."""
    # step 1. sample one response per prompt from the policy, from a seed of (seed, prompt): the same
    # sample whichever process draws it, and no global RNG state to resume
    seeds = [prompt_seed(seed, prompt) for prompt in prompts]
    drawn = generate_ids(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, seeds=seeds)
    examples = [as_example(prompt, response) for prompt, response in drawn]
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in collate(tokenizer.pad_token_id)(examples).items()}
    # the rollout's log-probs and values with dropout off, as the sampler drew (the reference is frozen)
    with evaluating(policy, critic):
        logps, _, _ = policy_logps(policy, batch, cfg.temperature)
        values = critic_values(critic, batch["input_ids"], batch["attention_mask"])
    reference_logps, _, _ = policy_logps(reference, batch, cfg.temperature)

    # step 2. score each prompt + response with the reward model
    finished = ended(tokenizer, drawn)
    scores = reward(prompts, decode_responses(tokenizer, drawn), finished).float()
    columns = [len(example["input_ids"]) - 1 for example in examples]
    return [
        example
        | {
            "logps": logps[i, :n].cpu(),
            "reference_logps": reference_logps[i, :n].cpu(),
            "values": values[i, :n].cpu(),
            "score": float(scores[i]),
            "finished": finished[i],
        }
        for i, (example, n) in enumerate(zip(examples, columns))
    ]


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
    """Steps 1-4 on the global batch `prompts`: each process samples and scores its block (steps 1-2), and
    every process gets the whole rollout, so that the advantages are whitened over all of its tokens and
    any process can train on any row."""
    rows = distributed.map_sharded(
        lambda mine: experience(policy, reference, critic, reward, tokenizer, list(mine), cfg, seed), prompts
    )
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in collate(tokenizer.pad_token_id)(rows).items()}
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
    logps, reference_logps, values = (
        pad_sequence([row[key] for row in rows], batch_first=True).to(device)
        for key in ("logps", "reference_logps", "values")
    )
    # penalise responses cut off without EOS
    scores = torch.tensor([row["score"] for row in rows], device=device)
    has_eos = torch.tensor([row["finished"] for row in rows], device=device)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

    # step 3. per-token rewards: -kl_coef * KL estimate, plus the score on the last real response token
    rewards, non_score_rewards, kl = kl_penalized_rewards(
        scores, logps, reference_logps, mask, kl_coef, cfg.kl_estimator
    )

    # step 4. advantages by GAE, whitened over the response tokens of the whole rollout (every process's)
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


def optimise(
    model: torch.nn.Module, optimizer, accelerator: Accelerator, data: Rollout, cfg: PPOConfig, seed: int
) -> dict[str, float]:
    """Step 5. PPO epochs over minibatches: clipped policy loss + vf_coef x clipped value loss.

    `model` is the prepared `ActorCritic`. Minibatches of minibatch_size x N rows come from one permutation
    of the (global) rollout, the same on every process; each process trains on its block of each. Its
    token-mean losses, weighted by its share of the minibatch's tokens and by N (against DDP's mean over
    processes), make the update that of one process on the whole minibatch; the token-mean statistics,
    weighted alike and averaged over the processes, are those of the whole minibatch too."""
    world = distributed.world()
    size, step_rows = data.mask.shape[0], cfg.minibatch_size * world
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, step_rows):
            minibatch = order[start : start + step_rows]
            rows = distributed.shard(minibatch)
            batch = {k: v[rows] for k, v in data.batch.items()}
            mask = data.mask[rows]
            share = mask.sum() / data.mask[minibatch].sum() * world  # exactly 1 on one process
            logits, values = model(batch["input_ids"], batch["attention_mask"])
            logits = logits / cfg.temperature
            logps, _ = token_logps(logits, batch["labels"])
            pg_loss, pg_stats = ppo_policy_loss(
                logps, data.old_logps[rows], data.advantages[rows], mask, cfg.clip_range
            )
            vf_loss, vf_stats = ppo_value_loss(
                values, data.old_values[rows], data.returns[rows], mask, cfg.clip_range_value
            )
            accelerator.backward((pg_loss + cfg.vf_coef * vf_loss) * share)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            weight = share.item()
            with torch.no_grad():
                entropy = masked_entropy(logits[:, :-1], mask).mean().item()
            for key, value in {
                "policy/approxkl_avg": pg_stats["approxkl"] * weight,
                "policy/clipfrac_avg": pg_stats["clipfrac"] * weight,
                "loss/policy_avg": pg_loss.item() * weight,
                "loss/value_avg": vf_loss.item() * weight,
                "val/clipfrac_avg": vf_stats["clipfrac"] * weight,
                "objective/entropy": entropy,
                "grad_norm": float(grad_norm),
            }.items():
                totals.setdefault(key, []).append(value)
    return distributed.reduce_mean({key: float(np.mean(values)) for key, values in totals.items()})


def save_checkpoint(
    path: Path, fingerprint: str, done: int, policy, critic, optimizers, kl_control, history
) -> None:
    """policy, critic, optimizers, KL controller and RNG states in step_<done>/state.pt (weights_only-safe);
    the rollout count and the curves in its meta. Under several processes the main one calls it (they
    hold the same state, and PPO draws nothing from the global RNGs that a resume would need) and every
    process loads it."""
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
    """The outer loop: rollouts 1..cfg.rollouts, each steps 1-5, then step 6 (the KL controller). Rollout k
    takes the k-th window of rollout_batch_size x N prompts (N processes) of an order drawn from (seed,
    epoch)."""
    # step_scheduler_with_optimizer off, as in the shared trainer (PPO has no scheduler to step)
    accelerator = Accelerator(
        cpu=distributed.use_cpu(cfg.train.device),
        mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,
    )
    world = distributed.world()
    policy, reference, critic = (m.to(distributed.device()) for m in (policy, reference, critic))
    # one AdamW, a parameter group each (AdamW's update is per parameter: as two optimizers would)
    head = critic.own_parameters() if isinstance(critic, PolicyValueHead) else critic.parameters()
    groups = [
        {"params": list(policy.parameters()), "lr": cfg.train.learning_rate},
        {"params": list(head), "lr": cfg.train.critic_learning_rate},
    ]
    optimizer = make_optimizer(groups, cfg.train, accelerator.device)
    # the GPU knobs on each model (a value head on the policy shares its checkpointed transformer)
    trained = ActorCritic(
        prepare_model(policy, cfg.train),
        critic if isinstance(critic, PolicyValueHead) else prepare_model(critic, cfg.train),
    )
    model, optimizer = accelerator.prepare(trained, optimizer)
    kl_control = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target
        else FixedKLController(cfg.kl_coef)
    )
    done, history = 0, []
    if checkpoint_dir is not None and cfg.train.resume:
        done, history = load_checkpoint(checkpoint_dir, fingerprint, policy, critic, [optimizer], kl_control)
    rollout_size = cfg.rollout_batch_size * world
    windows = len(window_indices(len(prompts), rollout_size, 1, cfg.train.seed, 0))
    if windows == 0:
        raise ValueError(f"{len(prompts)} prompts are fewer than one rollout ({rollout_size}, all processes)")
    timing = {"generation_seconds": 0.0, "training_seconds": 0.0}
    model.train()
    for k in tqdm(
        range(done, cfg.rollouts),
        initial=done,
        total=cfg.rollouts,
        desc="ppo",
        unit="rollout",
        mininterval=2.0,
        disable=not distributed.is_main(),
    ):
        epoch, position = divmod(k, windows)
        rows = window_indices(len(prompts), rollout_size, 1, cfg.train.seed, epoch)[position]
        seed = cfg.train.seed * 1_000_003 + k
        # dropout (if any) draws from a seed of (seed, k, process): a resumed run draws as the first did
        torch.manual_seed(hash((seed, distributed.rank())))
        started = time.perf_counter()
        with accelerator.autocast():  # the precision the optimisation's ratios are taken in
            data = rollout(
                policy,
                reference,
                critic,
                reward,
                tokenizer,
                [prompts[i] for i in rows],
                cfg,
                kl_control.value,
                seed,
            )
        middle = time.perf_counter()
        stats = optimise(model, optimizer, accelerator, data, cfg, seed)
        # step 6. adapt the KL coefficient to the rollout's KL (over all processes' samples)
        kl_control.update(data.stats["objective/kl"], rollout_size)
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
            if distributed.is_main():
                save_checkpoint(
                    checkpoint_dir, fingerprint, k + 1, policy, critic, [optimizer], kl_control, history
                )
            distributed.barrier()
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
    torch.manual_seed(cfg.train.seed)  # fresh weights (LoRA adapter, new critic head): the same every run
    tokenizer, policy, reference = load_policy_and_reference(paths.sft, cfg.lora)
    check_max_length(cfg.max_length, policy, "ppo.max_length")
    reward_path = reward_model_path(paths, cfg.reward_model)
    reward = RewardScorer(reward_path, max_length=cfg.max_length)
    critic_path = {"reward_model": reward_path, "sft": paths.sft}.get(cfg.critic_init, cfg.critic_init)
    critic = PolicyValueHead(policy) if cfg.critic_init == "policy_head" else load_reward_model(critic_path)
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    fingerprint = checkpoint_fingerprint("ppo", cfg, paths.root)
    logger.info(
        "PPO: %d rollouts of %d prompts (all processes), kl_coef %g (%s), critic from %s",
        cfg.rollouts,
        cfg.rollout_batch_size * distributed.world(),
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
