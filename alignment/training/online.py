"""The one online-RL loop, shared by PPO, GRPO and RLOO: an experience maker and an optimiser (OpenRLHF's
split), with a method's hooks in between. A method (`OnlineMethod`) supplies only what differs: its
advantages (step 4), its loss (step 5) and what it does after a batch (PPO's KL controller).

Each generation batch is five numbered steps:
  1. sample k completions per prompt from the current policy (k = 1 for PPO): sample i of prompt x in
     batch r draws from the seed `prompt_seed(batch_seed(seed, r), x, i)`, so it depends on neither its
     batch's other prompts nor the process that drew it;
  2. score each completion with the reward (the RM, the gold scorer, ...);
  3. log-probs of the sampled tokens under the policy as it sampled, the critic's values (PPO) and, when
     the method needs them, the frozen reference's log-probs; every model in eval mode (dropout is off
     throughout anyway: a dropout mask drawn anew in step 5 would make the first ratio differ from 1);
  4. the method's advantages, over the whole batch;
  5. `passes` passes over shuffled minibatches of the batch: the method's loss, AdamW, clipping.

Several processes (torchrun, accelerate): `prompts_per_batch` and `minibatch_size` are per process, as a
batch size is, so N processes with b / N and m / N make the updates of one with b and m. Batch r's prompts
are a window of an order drawn from (seed, epoch); each process samples and scores its contiguous block of
them (a prompt's k completions stay on one process) and all gather the whole batch, so the advantages
(PPO's whitening, GRPO's groups) are those of one process. Each process then trains on its block of each
minibatch of one global permutation, its loss weighted by its share of the minibatch's loss units (tokens
or completions) times N, against DDP's mean over processes.

Every (B, T) tensor lives on the shifted token grid of `token_logps` (column j is token j + 1; `mask`
marks completion tokens); rows are group-major, row g * k + i is prompt g's completion i. A checkpoint
every `train.checkpoint_every` batches holds the models, AdamW, the method's state, every RNG, the batch
count and the curves (alignment/training/checkpoint.py): a run killed after one resumes to the same
weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from alignment.config import OptimizerConfig
from alignment.data.batching import as_example, collate
from alignment.losses.logprobs import IGNORE_INDEX, token_entropy, token_logps
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.reward_model import token_scores
from alignment.models.scoring import response_token_logps
from alignment.rewards.combine import reward_metrics
from alignment.rewards.source import RewardSource
from alignment.training import checkpoint, distributed, sharding
from alignment.training.engine import Engine
from alignment.training.trainer import evaluating, make_optimizer, prepare_model, window_indices

logger = logging.getLogger(__name__)

# (prompts, responses, finished) -> one score per completion (a tensor, an array or a list); or a reward
# computed by code (alignment/rewards/source.py `RewardSource`), which also gets the sampled ids and the
# prompts' data columns (the prompts `train` is given are `PromptRow`s: text carrying their row's columns)
Reward = Callable[[list[str], list[str], list[bool]], object] | RewardSource


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs, read from a stage's config (PPO and the group methods name them differently)."""

    train: OptimizerConfig
    batches: int  # generation rounds (PPO: rollouts)
    prompts_per_batch: int  # per process (PPO: rollout_batch_size)
    samples_per_prompt: int  # k (PPO: 1)
    passes: int  # optimisation passes over each batch (PPO: ppo_epochs; GRPO: num_iterations)
    minibatch_size: int  # completions per optimizer step, per process
    max_new_tokens: int
    temperature: float  # of the sampler; log-probs are of this distribution
    critic_learning_rate: float | None = None  # PPO's critic, a parameter group of its own
    generation_batch_size: int = 256  # prompts sampled at once (step 1)
    scoring_batch_size: int = 64  # sequences per forward pass of step 3


@dataclass
class Rollout:
    """A generation batch with everything the optimisation needs, computed once (steps 1-4)."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (B, T)
    mask: torch.Tensor  # (B, T - 1) float, 1 on completion tokens
    old_logps: torch.Tensor  # (B, T - 1) under the policy that sampled
    reference_logps: torch.Tensor | None  # (B, T - 1), when the method uses the reference
    old_values: torch.Tensor | None  # (B, T - 1), the critic's (PPO)
    scores: torch.Tensor  # (B,) the reward of each completion
    finished: torch.Tensor  # (B,) bool, ended with EOS (not cut at max_new_tokens)
    advantages: torch.Tensor | None = None  # (B,) or (B, T - 1): step 4
    returns: torch.Tensor | None = None  # (B, T - 1): PPO's value targets
    stats: dict[str, float] = field(default_factory=dict)

    def rows(self, index: torch.Tensor) -> Rollout:
        """The rollout's rows `index` (a minibatch, or one process's block of it)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Rollout(
            {key: value[index] for key, value in self.batch.items()},
            self.mask[index],
            self.old_logps[index],
            pick(self.reference_logps),
            pick(self.old_values),
            self.scores[index],
            self.finished[index],
            pick(self.advantages),
            pick(self.returns),
        )


@dataclass
class Outputs:
    """Step 5's forward pass over a minibatch: what a method's loss reads."""

    logps: torch.Tensor  # (B, T - 1) sampled-token log-probs, with gradient
    entropy: torch.Tensor  # (B, T - 1) of the sampling distribution at position j (token j + 1), no gradient
    values: torch.Tensor | None  # (B, T - 1) the critic's, with gradient (PPO)


class OnlineMethod:
    """What PPO, GRPO and RLOO do differently. `uses_reference`: step 3 scores the samples under the frozen
    reference; `loss_units`: what the loss averages over (`tokens` or `completions`), which weighs each
    process's share of a minibatch."""

    uses_reference: bool = False
    loss_units: str = "tokens"

    def advantages(self, rollout: Rollout) -> None:
        """Step 4: set `rollout.advantages` (and `returns`), and add the batch's statistics to `stats`."""
        raise NotImplementedError

    def loss(self, outputs: Outputs, rows: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Step 5: the loss of a minibatch (this process's rows of it) and its statistics."""
        raise NotImplementedError

    def after_batch(self, rollout: Rollout, num_samples: int) -> None:
        """After step 5 (PPO adapts its KL coefficient to the batch's KL)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TokenValues(torch.nn.Module):
    """A critic as a module whose forward returns the values (B, T - 1) of every state: a reward model read
    at every position (`critic_values`). Its outputs carry the gradient, so FSDP2, which gathers a root's
    parameters for the backward pass through hooks on the root's outputs, shards it as it is trained."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return critic_values(self.critic, input_ids, attention_mask)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.critic, "supports_gradient_checkpointing", False)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.critic.gradient_checkpointing_enable(**kwargs)


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic (if any) as the one module accelerate prepares (DDP under several processes): one
    forward gives the policy's logits (B, T, V) and the critic's values (B, T - 1), and one set of gradient
    hooks syncs both, a transformer they share (a value head on the policy) counted once."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask).logits
        values = None if self.critic is None else self.critic(input_ids, attention_mask)
        return logits, values


def critic_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) value of each state: the critic's scalar head at position j values token j + 1."""
    return token_scores(critic, input_ids, attention_mask)[:, :-1]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good, as TRL's online trainers do: step 5 trains in train mode (gradient
    checkpointing needs it), and a fresh dropout mask there would make the policy that is trained another
    one than the policy that sampled, so that the first ratio of every batch is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention
            module.attention_dropout = 0.0


def batch_seed(seed: int, batch: int) -> int:
    """The seed of generation batch `batch`: its samples and its minibatch order."""
    return seed * 1_000_003 + batch


def sampled_logps(policy, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """(B, T - 1) sampled-token log-probs at the sampling temperature (logits at response positions only)."""
    return response_token_logps(policy, batch, temperature)


def by_rows(fn, batch: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """fn over blocks of `size` rows of a padded batch, concatenated: one forward never holds more."""
    rows = batch["input_ids"].shape[0]
    return torch.cat(
        [fn({key: value[i : i + size] for key, value in batch.items()}) for i in range(0, rows, size)]
    )


@torch.no_grad()
def experience(
    policy,
    reference,
    critic,
    reward: Reward,
    tokenizer,
    prompts: list[str],
    settings: LoopSettings,
    seed: int,
) -> list[dict]:
    """Steps 1-3 for one process's prompts: per completion its example (`as_example`), its log-probs under
    the policy (and reference) and the critic's values on its own columns of the shifted grid (its length
    - 1), its score and whether it ended with EOS; on the CPU, for `gather`."""
    # step 1. k completions per prompt, each from its own seed
    k = settings.samples_per_prompt
    expanded = [prompt for prompt in prompts for _ in range(k)]
    seeds = [prompt_seed(seed, prompt, i) for prompt in prompts for i in range(k)]
    with evaluating(policy):
        drawn = generate_ids(
            policy,
            tokenizer,
            expanded,
            settings.max_new_tokens,
            settings.temperature,
            batch_size=settings.generation_batch_size,
            seeds=seeds,
        )
    examples = [as_example(prompt, response) for prompt, response in drawn]
    device = next(policy.parameters()).device
    batch = {key: value.to(device) for key, value in collate(tokenizer.pad_token_id)(examples).items()}

    # step 2. score every completion; a reward computed by code also gets the sampled ids, and gives each
    # function's values, which travel with the rows to `make_rollout`'s rewards/<name>/mean|std
    finished, texts = ended(tokenizer, drawn, policy), decode_responses(tokenizer, drawn)
    terms = [{}] * len(drawn)
    if isinstance(reward, RewardSource):
        scored = reward.score(expanded, texts, [response for _, response in drawn], finished)
        scores, terms = torch.tensor(scored.totals), scored.rows()
    else:
        scores = torch.as_tensor(np.asarray(reward(expanded, texts, finished)))

    # step 3. log-probs under the sampling policy, the critic's values, the reference's log-probs
    size = settings.scoring_batch_size
    with evaluating(policy, *([critic] if critic is not None else [])):
        columns = {"logps": by_rows(lambda b: sampled_logps(policy, b, settings.temperature), batch, size)}
        if critic is not None:
            columns["values"] = by_rows(lambda b: critic(b["input_ids"], b["attention_mask"]), batch, size)
    if reference is not None:
        columns["reference_logps"] = by_rows(
            lambda b: sampled_logps(reference, b, settings.temperature), batch, size
        )
    lengths = [len(example["input_ids"]) - 1 for example in examples]
    return [
        example
        | {key: value[i, :n].float().cpu() for key, value in columns.items()}
        | {"score": float(scores[i]), "finished": finished[i], "reward_terms": terms[i]}
        for i, (example, n) in enumerate(zip(examples, lengths))
    ]


def make_rollout(
    policy,
    reference,
    critic,
    reward: Reward,
    tokenizer,
    prompts: list[str],
    settings: LoopSettings,
    seed: int,
) -> Rollout:
    """Steps 1-3 on the batch's `prompts` (every process's): each process samples and scores its block,
    and every process gets the whole batch."""
    rows = distributed.map_sharded(
        lambda mine: experience(policy, reference, critic, reward, tokenizer, list(mine), settings, seed),
        prompts,
    )
    device = next(policy.parameters()).device
    batch = {key: value.to(device) for key, value in collate(tokenizer.pad_token_id)(rows).items()}
    padded = {
        key: pad_sequence([row[key] for row in rows], batch_first=True).to(device)
        for key in ("logps", "reference_logps", "values")
        if key in rows[0]
    }
    finished = torch.tensor([row["finished"] for row in rows], device=device)
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
    rollout = Rollout(
        batch=batch,
        mask=mask,
        old_logps=padded["logps"],
        reference_logps=padded.get("reference_logps"),
        old_values=padded.get("values"),
        scores=torch.tensor([row["score"] for row in rows], device=device, dtype=torch.float),
        finished=finished,
    )
    rollout.stats = {
        "completions/mean_length": mask.sum(-1).mean().item(),
        "completions/clipped_ratio": 1.0 - finished.float().mean().item(),  # cut at max_new_tokens, no EOS
    } | reward_metrics([row["reward_terms"] for row in rows])  # each reward function's (TRL's names)
    return rollout


def _units(mask: torch.Tensor, loss_units: str) -> torch.Tensor:
    return mask.sum() if loss_units == "tokens" else torch.tensor(float(mask.shape[0]), device=mask.device)


def optimise(
    model: PolicyAndCritic,
    optimizer,
    engine: Engine,
    rollout: Rollout,
    settings: LoopSettings,
    method: OnlineMethod,
    seed: int,
) -> dict[str, float]:
    """Step 5. `passes` over minibatches of minibatch_size x N rows, one optimizer step each. The minibatches
    come from one permutation of the (global) batch, the same on every process; each process trains on its
    block of each, its loss weighted by its share of the minibatch's loss units and by N, so the update is
    that of one process on the whole minibatch; the statistics, weighted alike and averaged over the
    processes, are those of the whole minibatch too."""
    world = distributed.world()
    size, step_rows = rollout.mask.shape[0], settings.minibatch_size * world
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {}
    for _ in range(settings.passes):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, step_rows):
            minibatch = order[start : start + step_rows].to(rollout.mask.device)
            rows = rollout.rows(distributed.shard(minibatch))
            whole = _units(rollout.mask[minibatch], method.loss_units)
            share = _units(rows.mask, method.loss_units) / whole * world  # exactly 1 on one process
            logits, values = model(rows.batch["input_ids"], rows.batch["attention_mask"])
            # the vocabulary-wide softmaxes a chunk of rows at a time, at the sampling temperature
            logps, _ = token_logps(logits, rows.batch["labels"], settings.temperature)
            entropy = token_entropy(logits[:, :-1], settings.temperature)
            loss, stats = method.loss(Outputs(logps, entropy, values), rows)
            engine.backward(loss * share)
            grad_norm = engine.clip_grad_norm_(model, settings.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            weight = share.item()
            # TRL's `entropy`: the token mean over the minibatch's completion tokens (every process's)
            tokens = rollout.mask[minibatch].sum().clamp(min=1)
            entropy = torch.where(rows.mask.bool(), entropy, 0).sum() / tokens * world
            stats = {key: value * weight for key, value in stats.items()} | {"loss": loss.item() * weight}
            stats |= {"entropy": entropy.item(), "grad_norm": float(grad_norm)}
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
    return distributed.reduce_mean({key: float(np.mean(values)) for key, values in totals.items()})


def _trained_parameters(policy, critic, settings: LoopSettings) -> list[dict]:
    """AdamW's parameter groups: the policy's, and the critic's own at its learning rate (a value head on
    the policy brings only its head: the body is the policy's)."""
    groups = [{"params": list(policy.parameters()), "lr": settings.train.learning_rate}]
    if critic is not None:
        inner = critic.critic  # TokenValues' model
        own = inner.own_parameters() if hasattr(inner, "own_parameters") else inner.parameters()
        groups.append(
            {"params": list(own), "lr": settings.critic_learning_rate or settings.train.learning_rate}
        )
    return groups


def train(
    policy,
    reference,
    reward: Reward,
    tokenizer,
    prompts: list[str],
    settings: LoopSettings,
    method: OnlineMethod,
    checkpoint_dir: Path | None,
    fingerprint: str,
    critic=None,
    log_metrics=None,
    desc: str = "online",
) -> tuple[list[dict], dict[str, float]]:
    """The outer loop: generation batches 1..settings.batches, each steps 1-5 and the method's `after_batch`.
    `policy` is trained in place (with `critic`, if any); `reference` is frozen (None when the method needs
    none). Under FSDP2 (alignment/training/engine.py) policy, critic and reference are each sharded, one root
    apiece with every decoder layer a unit, and gathered once per generation batch for steps 1-3, so that
    each process samples and scores its own block of prompts. Returns the per-batch curves and the wall time
    split into generation (steps 1-4) and training (step 5)."""
    cfg = settings.train
    engine = Engine(cfg)
    world = distributed.world()
    shares_body = critic is not None and hasattr(critic, "own_parameters")  # a value head on the policy
    if shares_body and engine.fsdp:
        raise NotImplementedError(
            "critic_init: policy_head under FSDP2: pick reward_model or sft (a critic of its own)"
        )
    for model in (policy, critic):
        if model is not None:
            disable_dropout(model)
    critic = None if critic is None else TokenValues(critic)
    policy = engine.place(policy)
    critic = critic.to(engine.device) if shares_body else engine.place(critic)
    reference = engine.place(reference, frozen=True) if method.uses_reference else None
    optimizer = make_optimizer(_trained_parameters(policy, critic, settings), cfg, engine.device)
    state = PolicyAndCritic(policy, critic)  # what checkpoints hold (the compiled wrapper shares its weights)
    trained = PolicyAndCritic(
        prepare_model(policy, cfg), critic if critic is None or shares_body else prepare_model(critic, cfg)
    )
    model, optimizer, _ = engine.prepare(trained, optimizer)

    done, history = 0, []
    if checkpoint_dir is not None and cfg.resume:
        found = checkpoint.load(checkpoint_dir, fingerprint)
        if found is not None:
            folder, meta = found
            method.load_state_dict(engine.load_state(folder, state, optimizer)["method"])
            done, history = meta["step"], meta["history"]
            logger.info("resumed from %s (batch %d)", folder, done)
    batch_prompts = settings.prompts_per_batch * world
    windows = len(window_indices(len(prompts), batch_prompts, 1, cfg.seed, 0))
    if windows == 0:
        raise ValueError(
            f"{len(prompts)} prompts are fewer than one batch of {batch_prompts} (all processes)"
        )
    timing = {"generation_seconds": 0.0, "training_seconds": 0.0}
    model.train()
    for r in tqdm(
        range(done, settings.batches),
        initial=done,
        total=settings.batches,
        desc=desc,
        unit="batch",
        mininterval=2.0,
        disable=not distributed.is_main(),
    ):
        epoch, position = divmod(r, windows)
        rows = window_indices(len(prompts), batch_prompts, 1, cfg.seed, epoch)[position]
        seed = batch_seed(cfg.seed, r)
        torch.manual_seed(hash((seed, distributed.rank())))  # anything else drawn from the global RNG
        started = time.perf_counter()
        # the precision the optimisation's ratios are taken in; whole models for each process's own prompts
        with engine.autocast(), sharding.gathered(policy, reference, critic):
            rollout = make_rollout(
                policy, reference, critic, reward, tokenizer, [prompts[i] for i in rows], settings, seed
            )
        method.advantages(rollout)  # step 4, on every process alike
        middle = time.perf_counter()
        stats = optimise(model, optimizer, engine, rollout, settings, method, seed)
        method.after_batch(rollout, len(rows) * settings.samples_per_prompt)
        timing["generation_seconds"] += middle - started
        timing["training_seconds"] += time.perf_counter() - middle
        row = {"step": r + 1, **rollout.stats, **stats}
        history.append(row)
        if log_metrics:
            log_metrics({key: value for key, value in row.items() if key != "step"}, r + 1)
        if checkpoint_dir is not None and cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(engine, checkpoint_dir, fingerprint, r + 1, state, optimizer, method, history)
    return history, timing


def save_checkpoint(
    engine: Engine, path: Path, fingerprint: str, done: int, state, optimizer, method: OnlineMethod, history
) -> None:
    """The models (policy and critic), AdamW, the method's state and every process's RNG in step_<done>/
    (weights_only-safe; under FSDP2 each process's shards); the count and the curves in its meta. Every
    process calls it."""

    def write(folder: Path) -> None:
        engine.save_state(folder, state, optimizer, extra={"method": method.state_dict()})

    checkpoint.save(path, done, fingerprint, write, {"history": history})


def summary(history: list[dict], timing: dict[str, float]) -> dict[str, float]:
    """The last batch's curves as `train/<name>`, the wall time and the batch count."""
    last = {f"train/{key}": value for key, value in history[-1].items() if key != "step"}
    return last | timing | {"batches": len(history)}
