"""brain: BRAIn (Pandey et al., ICML 2024) from the SFT policy, towards the posterior
p(y|x) ∝ p_sft(y|x) L(x, y) defined by the reward model.

The outer loop, in numbered steps:
  1. Draw n samples per training prompt from the proposal (the SFT model at first) and keep, per
     sample, its tokens, log q (of the model that drew it), log p_sft and the reward-model score. Each
     sample has its own seed (prompt, slot, step); several processes draw and score a block each and
     all gather the same samples.
  2. Train with the shared loop: each step's prompts bring their n samples; `brain_loss` turns
     log pi_theta, log q and log p_sft + log L into the self-normalised objective.
  3. Every `proposal.refresh_every` steps, redraw a `policy_fraction` of each prompt's samples from
     the current policy (its slots n - m .. n - 1; the other slots stay SFT samples), so the proposal
     is a mixture of SFT and the latest policy. The samples are saved in each checkpoint (the trainer's
     `extra_state`): a resume reloads them, and a refresh is the only generation cost after step 1.
  4. Policy vs SFT on held-out prompts, judged by the gold scorer and the reward model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from alignment import precision
from alignment.config import BRAInConfig
from alignment.data.batching import as_example, collate
from alignment.data.prompts import load_prompts
from alignment.losses.brain_loss import brain_loss, log_likelihood
from alignment.losses.logprobs import sequence_logps
from alignment.models import scoring
from alignment.models.generation import decode_responses, ended, generate_ids, prompt_seed
from alignment.models.loading import check_max_length
from alignment.models.reward_model import RewardScorer
from alignment.paths import Paths
from alignment.plots import loss_curve
from alignment.stages.common import (
    compare_on_held_out,
    load_policy_and_reference,
    log_held_out,
    reward_scorer,
    run_dtype,
    save_model,
)
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training import distributed, sharding
from alignment.training.checkpoint import fingerprint as checkpoint_fingerprint
from alignment.training.trainer import evaluating, train, window_indices

logger = logging.getLogger(__name__)


@torch.no_grad()
def score_logps(model, examples: list[dict], batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """(N,) summed response log-probs of token-level examples under `model` (in eval mode) at
    `temperature`, `batch_size` sequences per forward."""
    with evaluating(model):
        return scoring.sequence_logps(model, examples, batch_size, temperature)


class SampleStore:
    """Step 1's samples: n per prompt, each with its tokens, log q, log p_sft, reward and birth step."""

    def __init__(self, count: int, n: int):
        self.n = n
        self.prompt_ids: list[list[int]] = [[] for _ in range(count)]
        self.response_ids: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(count)]
        self.proposal_logps, self.sft_logps, self.rewards = (torch.zeros(count, n) for _ in range(3))
        self.drawn_at = torch.zeros(count, n, dtype=torch.long)
        self.baseline_rewards = torch.zeros(count)

    def state_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_state_dict(cls, state: dict) -> SampleStore:
        store = cls.__new__(cls)
        vars(store).update(state)
        return store


class Sampler:
    """Draws samples from a model into given slots of the store and scores them. Sample `slot` of a prompt
    drawn at step s has its own seed (`prompt_seed`), so a sample does not depend on the batch or the
    process that drew it: the processes each draw and score a block of the samples and all gather the
    same store, whatever their number."""

    def __init__(self, cfg: BRAInConfig, tokenizer, prompts: list[str], sft, reward: RewardScorer, seed: int):
        self.cfg, self.tokenizer, self.prompts, self.sft, self.reward = cfg, tokenizer, prompts, sft, reward
        self.seed, self.dtype = seed, precision.resolve_dtype(cfg.compute.dtype)

    def sample(self, model, items: Sequence[tuple[int, int]], step: int) -> list[tuple]:
        """(prompt ids, response ids, log q, log p_sft, reward) of sample `slot` of prompt `i` drawn from
        `model` at `step`, for each (i, slot) of `items`."""
        if not items:  # more processes than samples
            return []
        cfg, prompts = self.cfg, [self.prompts[i] for i, _ in items]
        seeds = [prompt_seed(self.seed * 1_000_003 + step, p, slot) for p, (_, slot) in zip(prompts, items)]
        at_once = cfg.compute.scoring_batch_size
        with precision.autocast(self.dtype):
            drawn = generate_ids(
                model,
                self.tokenizer,
                prompts,
                cfg.max_new_tokens,
                cfg.temperature,
                batch_size=cfg.compute.generation_batch_size,
                seeds=seeds,
            )
            examples = [as_example(prompt, response) for prompt, response in drawn]
            proposal = score_logps(model, examples, at_once, cfg.temperature)
            sft = (
                proposal
                if model is self.sft and cfg.temperature == 1.0
                else score_logps(self.sft, examples, at_once)
            )
        finished = ended(self.tokenizer, drawn, model)
        rewards = self.reward(prompts, decode_responses(self.tokenizer, drawn), finished)
        scores = torch.stack([proposal, sft, rewards], dim=1).tolist()
        return [(prompt, response, *row) for (prompt, response), row in zip(drawn, scores)]

    def draw(self, model, store: SampleStore, slots: range, step: int) -> None:
        items = [(i, slot) for i in range(len(self.prompts)) for slot in slots]
        with sharding.gathered(model, self.sft):  # whole on every process (FSDP2): each draws its own block
            scored = distributed.map_sharded(lambda part: self.sample(model, part, step), items)
        for (i, slot), (prompt, response, proposal, sft, reward) in zip(items, scored):
            store.prompt_ids[i] = prompt  # as the model saw it (left-truncated if too long)
            store.response_ids[i][slot] = response
            store.proposal_logps[i, slot] = proposal
            store.sft_logps[i, slot] = sft
            store.rewards[i, slot] = reward
            store.drawn_at[i, slot] = step

    def fresh_store(self) -> SampleStore:
        """n SFT samples per prompt, plus (for the Bradley-Terry likelihood) one more, slot n, as y_bar."""
        store = SampleStore(len(self.prompts), self.cfg.samples_per_prompt)
        self.draw(self.sft, store, range(store.n), step=0)
        if self.cfg.likelihood == "bradley_terry":
            items = [(i, store.n) for i in range(len(self.prompts))]
            with sharding.gathered(self.sft):
                baseline = distributed.map_sharded(lambda part: self.sample(self.sft, part, 0), items)
            store.baseline_rewards = torch.tensor([reward for *_, reward in baseline])
        return store


def make_collate(store_ref: dict, cfg: BRAInConfig, pad_token_id: int):
    """A batch of prompts, each with its n samples: (B * n, T) tokens and (B, n) log-densities."""
    pad = collate(pad_token_id)

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        store: SampleStore = store_ref["store"]
        rows = [e["index"] for e in examples]
        batch = pad([as_example(store.prompt_ids[i], r) for i in rows for r in store.response_ids[i]])
        log_l = log_likelihood(
            store.rewards[rows], cfg.reward_beta, cfg.likelihood, store.baseline_rewards[rows]
        )
        return batch | {
            "proposal_logps": store.proposal_logps[rows],
            "target_logps": store.sft_logps[rows] + log_l,
            "sft_logps": store.sft_logps[rows],
            "rewards": store.rewards[rows],
            "drawn_at": store.drawn_at[rows],
        }

    return collate_fn


def make_step(cfg: BRAInConfig, state: dict):
    def step(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy_logps = sequence_logps(logits, batch["labels"]).view_as(batch["proposal_logps"])
        losses, diagnostics = brain_loss(
            policy_logps, batch["proposal_logps"], batch["target_logps"], cfg.baseline, cfg.self_normalize
        )
        # KL(pi || p_sft), self-normalised importance sampling from the proposal's samples
        detached = policy_logps.detach()
        pi_weights = torch.softmax(detached - batch["proposal_logps"], dim=-1)
        kl = (pi_weights * (detached - batch["sft_logps"])).sum(-1)
        metrics = {
            "brain/ess": diagnostics["ess"].mean().item(),
            "brain/ess_fraction": diagnostics["ess"].mean().item() / policy_logps.shape[-1],
            "brain/alpha_entropy": diagnostics["alpha_entropy"].mean().item(),
            "objective/scores": batch["rewards"].mean().item(),
            "objective/kl": kl.mean().item(),
            "proposal/age": (state["step"] - batch["drawn_at"].float()).mean().item(),
            "proposal/policy_fraction": (batch["drawn_at"] > 0).float().mean().item(),
        }
        return losses.sum(), metrics

    return step


def count_prompts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor(batch["proposal_logps"].shape[0])


def evaluation(store: SampleStore, cfg: BRAInConfig, pad_token_id: int, step, batch_size: int):
    """Loss, ESS and KL on held-out prompts' SFT samples."""
    collate_fn = make_collate({"store": store}, cfg, pad_token_id)

    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        totals, count = {}, 0
        for start in range(0, len(store.prompt_ids), batch_size):
            rows = [{"index": i} for i in range(start, min(start + batch_size, len(store.prompt_ids)))]
            loss_sum, metrics = step(model, {k: v.to(device) for k, v in collate_fn(rows).items()})
            for key, value in {"loss": loss_sum.item() / len(rows), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(rows)
            count += len(rows)
        return {key: value / count for key, value in totals.items() if not key.startswith("proposal/")}

    return evaluate


def run(cfg: BRAInConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    tokenizer, policy, sft = load_policy_and_reference(paths.sft, cfg.lora, cfg.train.seed, run_dtype(cfg))
    policy, sft = distributed.to_device(policy), distributed.to_device(sft)
    check_max_length(cfg.max_length, policy, "brain.max_length")
    reward = reward_scorer(paths, cfg.reward_model, cfg.max_length, cfg.compute)
    train_prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    eval_prompts = load_prompts(paths, "eval", cfg.source, max(1, cfg.train_prompts // 10), tokenizer)
    fingerprint = checkpoint_fingerprint("brain", cfg, paths.root)
    checkpoints = paths.checkpoints("brain")
    sampler = Sampler(cfg, tokenizer, train_prompts, sft, reward, cfg.train.seed)
    store_ref: dict = {}
    state = {"step": 0}
    prompts_per_window = cfg.train.batch_size * distributed.world()  # batch_size is per process
    windows = len(
        window_indices(len(train_prompts), prompts_per_window, cfg.train.grad_accum, cfg.train.seed, 0)
    )
    total_steps = min(cfg.train.epochs * windows, cfg.train.max_steps or 10**12)
    refresh, n = cfg.proposal.refresh_every, cfg.samples_per_prompt
    policy_slots = range(n - max(1, round(cfg.proposal.policy_fraction * n)), n)

    def restore_store(saved: dict) -> None:
        store_ref["store"] = SampleStore.from_state_dict(saved)
        logger.info("samples restored from the checkpoint")

    def on_start(step: int) -> None:
        """Step 1, unless a resumed checkpoint brought the samples back."""
        state["step"] = step
        if "store" not in store_ref:
            logger.info("step 1: %d SFT samples for each of %d prompts", n, len(train_prompts))
            store_ref["store"] = sampler.fresh_store()

    def on_step(done: int) -> None:
        """Step 3: redraw the policy's share of the samples."""
        state["step"] = done
        if refresh and done % refresh == 0 and done < total_steps:
            logger.info(
                "step %d: redrawing %d of %d samples per prompt from the policy", done, len(policy_slots), n
            )
            sampler.draw(policy, store_ref["store"], policy_slots, step=done)

    eval_store = Sampler(cfg, tokenizer, eval_prompts, sft, reward, cfg.train.seed + 7).fresh_store()
    step = make_step(cfg, state)
    logger.info(
        "BRAIn (%s baseline, self_normalize=%s, L=%s, beta_r %g): %d prompts x %d samples",
        cfg.baseline,
        cfg.self_normalize,
        cfg.likelihood,
        cfg.reward_beta,
        len(train_prompts),
        n,
    )
    result = train(
        policy,
        [{"index": i} for i in range(len(train_prompts))],
        make_collate(store_ref, cfg, tokenizer.pad_token_id),
        step,
        count_prompts,
        cfg.train,
        checkpoint_dir=checkpoints,
        fingerprint=fingerprint,
        evaluate=evaluation(eval_store, cfg, tokenizer.pad_token_id, step, cfg.train.batch_size),
        log_metrics=log.metrics if log else None,
        on_step=on_step,
        on_start=on_start,
        extra_state=(lambda: store_ref["store"].state_dict(), restore_store),
    )
    out = paths.out("brain")
    save_model(policy, tokenizer, out, cfg.lora)

    # step 4: policy vs SFT on held-out prompts
    held_out, rows = compare_on_held_out(policy, sft, tokenizer, paths, cfg, reward, cfg.train.seed, out=out)
    log_held_out("BRAIn", held_out)
    final = result.eval_history[-1]
    metrics = {f"eval/{k}": v for k, v in final.items() if k != "step"} | held_out
    metrics |= {
        "train/loss": result.history[-1]["loss"],
        "steps": result.steps,
        "train_seconds": result.seconds,
    }
    columns = ["step", "loss", "brain/ess_fraction", "objective/scores", "objective/kl", "proposal/age"]
    figure = loss_curve(result.history, result.eval_history, "BRAIn loss", ylabel="loss per prompt")
    finish(
        "brain",
        paths,
        log,
        metrics,
        csvs={"train.csv": (result.history, columns)},
        curves=(held_out, result.steps),
        figures={"plots/brain_loss.png": figure},
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )
    return metrics | {"mean_reward_final_samples": float(np.mean(store_ref["store"].rewards.numpy()))}
