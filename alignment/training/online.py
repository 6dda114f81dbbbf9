"""The online loop that GRPO and RLOO share: an experience maker and a trainer (OpenRLHF's split). A method
keeps only its advantages and its loss (`Method`, pure functions of alignment/losses/group_rl_loss.py).

Each generation batch is five numbered steps:
  1. sample k completions per prompt from the current policy; sample i of prompt x in round r draws from
     the seed `prompt_seed(seed, x, r * k + i)`, so it depends on neither its batch nor the process;
  2. score each completion with the reward (the RM on the decoded text, or the gold scorer);
  3. log-probs of the sampled tokens under the policy as it sampled (eval mode: no dropout) and, when the
     method has a KL term (beta > 0), under the frozen SFT reference;
  4. the method's advantages from the (G, k) rewards of the groups;
  5. `num_iterations` passes over shuffled minibatches of the batch: the method's loss, AdamW, clipping.
Every (B, T) tensor lives on the shifted token grid of `token_logps` (column j is token j + 1; `mask`
marks completion tokens); rows are group-major, row g * k + i is prompt g's completion i.

A checkpoint every `train.checkpoint_every` batches holds the policy, AdamW, every RNG, the batch count
and the curves (alignment/training/checkpoint.py); a run killed after one resumes to the same weights.
One process
(as PPO): the batch is not split across ranks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.config import GroupRLConfig, OptimizerConfig
from alignment.data.batching import as_example, collate
from alignment.evaluation.heldout import evaluating
from alignment.losses.group_rl_loss import group_zero_std, sequence_kl
from alignment.losses.logprobs import token_logps
from alignment.losses.ppo_loss import masked_entropy
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.paths import Paths
from alignment.plots import plt
from alignment.stages.common import held_out_judges
from alignment.training import checkpoint
from alignment.training.trainer import window_indices

logger = logging.getLogger(__name__)

Reward = Callable[[list[str], list[str]], object]  # (prompts, responses) -> (N,) scores, tensor or array
CSV_COLUMNS = [
    "step",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "objective/kl",
    "entropy",
    "completions/mean_length",
    "clip_ratio/region_mean",
    "loss",
]


@dataclass(frozen=True)
class Method:
    """What GRPO and RLOO do differently: the advantages of a batch and the loss of a minibatch."""

    advantages: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    """(scores (G, k), KL of each sample to the reference (G, k) or None) -> advantages (G, k)"""
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    """(logps, old_logps, reference_logps or None, advantages (B,), mask) -> (loss, stats)"""


@dataclass
class Experience:
    """A generation batch with everything the optimisation needs, computed once (steps 1-4)."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (B, T)
    mask: torch.Tensor  # (B, T - 1)
    old_logps: torch.Tensor  # (B, T - 1)
    reference_logps: torch.Tensor | None  # (B, T - 1), when beta > 0
    advantages: torch.Tensor  # (B,)
    stats: dict[str, float]


def device(cfg: OptimizerConfig) -> torch.device:
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")


def reward_function(cfg: GroupRLConfig, paths: Paths, rm) -> Reward:
    """The reward the samples are trained on: `reward: rm` the reward model, `gold` the gold scorer on
    prompt + response (the judges the held-out comparison uses)."""
    return rm if cfg.reward == "rm" else held_out_judges(paths, rm)["gold"]


def policy_logps(model, batch: dict[str, torch.Tensor], cfg: GroupRLConfig):
    """(B, T - 1) sampled-token log-probs at the sampling temperature, the mask, and the logits."""
    bf16 = cfg.train.mixed_precision == "bf16"
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float() / cfg.temperature
    logps, mask = token_logps(logits, batch["labels"])
    return logps, mask, logits[:, :-1]


@torch.no_grad()
def make_experience(
    policy,
    reference,
    reward: Reward,
    tokenizer,
    prompts: list[str],
    cfg: GroupRLConfig,
    method: Method,
    batch_index: int,
) -> Experience:
    k, where = cfg.samples_per_prompt, next(policy.parameters()).device
    # step 1. k completions per prompt, each from its own seed
    expanded = [prompt for prompt in prompts for _ in range(k)]
    seeds = [prompt_seed(cfg.train.seed, prompt, batch_index * k + i) for prompt in prompts for i in range(k)]
    drawn = generate_ids(policy, tokenizer, expanded, cfg.max_new_tokens, cfg.temperature, seeds=seeds)
    batch = collate(tokenizer.pad_token_id)([as_example(p, r) for p, r in drawn])
    batch = {key: value.to(where) for key, value in batch.items()}

    # step 2. score every completion
    scores = reward(expanded, decode_responses(tokenizer, drawn), ended(tokenizer, drawn))
    scores = torch.as_tensor(np.asarray(scores))
    scores = scores.float().to(where)

    # step 3. log-probs under the sampling policy (no dropout) and, for a KL term, the reference
    with evaluating(policy):
        old_logps, mask, _ = policy_logps(policy, batch, cfg)
    reference_logps = policy_logps(reference, batch, cfg)[0] if cfg.beta > 0 else None
    kl = None if reference_logps is None else sequence_kl(old_logps, reference_logps, mask)

    # step 4. the method's advantages from the groups' rewards
    groups = scores.view(-1, k)
    advantages = method.advantages(groups, None if kl is None else kl.view(-1, k)).flatten()

    lengths = torch.tensor([len(r) for _, r in drawn], dtype=torch.float)
    has_eos = torch.tensor(ended(tokenizer, drawn), dtype=torch.float)
    stats = {
        "reward": scores.mean().item(),
        "reward_std": groups.std(dim=1).mean().item(),
        "frac_reward_zero_std": group_zero_std(groups).float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/clipped_ratio": 1.0 - has_eos.mean().item(),  # cut at max_new_tokens, no EOS
    }
    if kl is not None:
        stats["objective/kl"] = kl.mean().item()  # k1 KL(policy || SFT) of the batch's samples
    return Experience(batch, mask, old_logps, reference_logps, advantages, stats)


def optimise(
    policy, optimizer, data: Experience, cfg: GroupRLConfig, method: Method, seed: int
) -> dict[str, float]:
    """Step 5. `num_iterations` passes over shuffled minibatches, one optimizer step each."""
    generator = torch.Generator().manual_seed(seed)
    size, totals = data.mask.shape[0], {}
    for _ in range(cfg.num_iterations):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, cfg.minibatch_size):
            rows = order[start : start + cfg.minibatch_size].to(data.mask.device)
            logps, mask, logits = policy_logps(policy, {k: v[rows] for k, v in data.batch.items()}, cfg)
            reference_logps = None if data.reference_logps is None else data.reference_logps[rows]
            loss, stats = method.loss(
                logps, data.old_logps[rows], reference_logps, data.advantages[rows], mask
            )
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), cfg.train.max_grad_norm or float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # TRL's `entropy`: the mean over completion tokens
                entropy = masked_entropy(logits, mask).sum() / mask.sum().clamp(min=1)
            stats |= {"loss": loss.item(), "grad_norm": float(grad_norm), "entropy": entropy.item()}
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in totals.items()}


def save_checkpoint(path: Path, fingerprint: str, done: int, policy, optimizer, history: list) -> None:
    """policy, AdamW and RNG states in step_<done>/state.pt (weights_only-safe); the count and the curves
    in its meta."""
    state = {"policy": policy.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint.save_state(path, done, fingerprint, state, {"history": history})


def load_checkpoint(path: Path, fingerprint: str, policy, optimizer) -> tuple[int, list]:
    found = checkpoint.load_state(path, fingerprint)
    if found is None:
        return 0, []
    step, state, meta = found
    policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    return step, meta["history"]


def train(
    policy,
    reference,
    reward: Reward,
    tokenizer,
    prompts: list[str],
    cfg: GroupRLConfig,
    method: Method,
    checkpoint_dir: Path | None,
    fingerprint: str,
    log_metrics=None,
    desc: str = "group rl",
) -> tuple[list[dict], dict[str, float]]:
    """The outer loop: generation batches 1..cfg.batches, each steps 1-5. Returns the per-batch curves
    and the wall time split into generation (steps 1-4) and training (step 5)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"{desc} runs in one process; launch it without accelerate's --num_processes")
    windows = len(window_indices(len(prompts), cfg.prompts_per_batch, 1, cfg.train.seed, 0))
    if windows == 0:
        raise ValueError(f"{len(prompts)} prompts are fewer than one batch of {cfg.prompts_per_batch}")
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
    )
    torch.manual_seed(cfg.train.seed)  # dropout, if the model has any
    done, history = 0, []
    if checkpoint_dir is not None and cfg.train.resume:
        done, history = load_checkpoint(checkpoint_dir, fingerprint, policy, optimizer)
    timing = {"generation_seconds": 0.0, "training_seconds": 0.0}
    policy.train()
    for r in tqdm(
        range(done, cfg.batches), initial=done, total=cfg.batches, desc=desc, unit="batch", mininterval=2.0
    ):
        epoch, position = divmod(r, windows)
        rows = window_indices(len(prompts), cfg.prompts_per_batch, 1, cfg.train.seed, epoch)[position]
        started = time.perf_counter()
        data = make_experience(
            policy, reference, reward, tokenizer, [prompts[i] for i in rows], cfg, method, r
        )
        middle = time.perf_counter()
        stats = optimise(policy, optimizer, data, cfg, method, seed=cfg.train.seed * 1_000_003 + r)
        timing["generation_seconds"] += middle - started
        timing["training_seconds"] += time.perf_counter() - middle
        row = {"step": r + 1, **data.stats, **stats}
        history.append(row)
        if log_metrics:
            log_metrics({key: value for key, value in row.items() if key != "step"}, r + 1)
        if (
            checkpoint_dir is not None
            and cfg.train.checkpoint_every
            and (r + 1) % cfg.train.checkpoint_every == 0
        ):
            save_checkpoint(checkpoint_dir, fingerprint, r + 1, policy, optimizer, history)
    return history, timing


def summary(history: list[dict], timing: dict[str, float]) -> dict[str, float]:
    """The last batch's curves as `train/<name>`, the wall time and the batch count."""
    last = {f"train/{key}": value for key, value in history[-1].items() if key != "step"}
    return last | timing | {"batches": len(history)}


def curves(history: list[dict], title: str):
    """Reward and KL to SFT per generation batch, for MLflow."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["reward"] for r in history], label="reward")
    if "objective/kl" in history[-1]:
        axes[1].plot(steps, [r["objective/kl"] for r in history], label="objective/kl")
    axes[1].plot(steps, [r["entropy"] for r in history], label="entropy")
    for ax in axes:
        ax.set(xlabel="generation batch")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"{title}: reward, KL to SFT and entropy per generation batch")
    figure.tight_layout()
    return figure


def run_stage(
    name: str, cfg: GroupRLConfig, paths: Paths, log, method: Method, settings: str
) -> dict[str, float]:
    """A GRPO or RLOO stage from the SFT policy, in numbered steps; `settings` describes the method's
    knobs in the log line."""
    from alignment.data.prompts import load_prompts
    from alignment.models.loading import check_max_length
    from alignment.stages.common import (
        compare_on_held_out,
        load_policy_and_reference,
        log_held_out,
        reward_scorer,
        save_model,
    )
    from alignment.stages.results import finish
    from alignment.training.checkpoint import fingerprint

    # step 1. policy, reference, rewards
    label = name.upper()
    tokenizer, policy, reference = load_policy_and_reference(paths.sft, cfg.lora)
    check_max_length(cfg.max_length, policy, f"{name}.max_length")
    rm = reward_scorer(paths, cfg.reward_model, cfg.max_length)
    policy, reference = policy.to(device(cfg.train)), reference.to(device(cfg.train))
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    logger.info(
        "%s: %d batches of %d prompts x %d samples, %d iteration(s), %s, reward %s",
        label,
        cfg.batches,
        cfg.prompts_per_batch,
        cfg.samples_per_prompt,
        cfg.num_iterations,
        settings,
        cfg.reward,
    )

    # step 2. generation batches
    history, timing = train(
        policy,
        reference,
        reward_function(cfg, paths, rm),
        tokenizer,
        prompts,
        cfg,
        method,
        paths.checkpoints(name),
        fingerprint(name, cfg, paths.root),
        log.metrics if log else None,
        desc=name,
    )

    # step 3. save, then policy vs SFT on held-out prompts
    out = paths.out(name)
    save_model(policy, tokenizer, out, cfg.lora)
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, rm, cfg.train.seed, out=out
    )
    log_held_out(label, held_out)

    # step 4. metrics, plots, registration
    return finish(
        name,
        paths,
        log,
        summary(history, timing) | held_out,
        csvs={"train.csv": (history, CSV_COLUMNS)},
        curves=(held_out, len(history)),
        figures={f"plots/{name}.png": curves(history, label)},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )
