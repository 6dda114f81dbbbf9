"""What the policy stages repeat, written once: the policy with its frozen reference and tokenizer, the
reward model a params key names, the held-out judges and the comparison with SFT on held-out prompts.
(The end of every stage is `alignment.stages.results.finish`: a stage that loads no policy does not depend on
this module's model code.)"""

from __future__ import annotations

import logging
from pathlib import Path

from alignment.data.io import write_jsonl
from alignment.paths import Paths
from alignment.training import distributed, sharding

logger = logging.getLogger(__name__)


def load_policy_and_reference(path: Path, lora=None, seed: int = 0, dtype=None):
    """(tokenizer, policy, reference): two copies of the model at `path`, the reference frozen in eval
    mode (no dropout, no gradients) and in `dtype` (a torch dtype; None: float32), the policy in float32
    (the weights AdamW updates); with `lora` (a LoraConfig), one copy in `dtype`: the policy is the model
    with a fresh float32 adapter and the reference the same weights with the adapter off
    (`lora.AdapterDisabled`). Both on this process's device (`distributed.device()`)."""
    import torch

    from alignment.models.loading import load_causal_lm, load_tokenizer

    device, dtype = distributed.device(), dtype or torch.float32
    if lora is not None:
        from alignment.models.lora import AdapterDisabled, add_adapter

        policy = add_adapter(load_causal_lm(path, dtype=dtype), lora, seed).to(device)
        return load_tokenizer(path), policy, AdapterDisabled(policy)
    reference = load_causal_lm(path, dtype=dtype).eval().requires_grad_(False).to(device)
    if sharding.enabled():  # a frozen copy as big as the policy: sharded too, gathered where it samples
        sharding.shard(reference)
    return load_tokenizer(path), load_causal_lm(path, dtype=torch.float32).to(device), reference


def run_dtype(cfg):
    """The torch dtype of a stage's `compute.dtype` on this process's device (auto: bf16 on a GPU)."""
    from alignment.precision import resolve_dtype

    return resolve_dtype(cfg.compute.dtype)


def save_model(model, tokenizer, out: Path, lora=None) -> None:
    """A trained model as every later stage loads it: safetensors and tokenizer, or with `lora` the
    adapter alone (and the merged model too with `lora.merge_on_save`). Several processes hold the same
    weights (or, under FSDP / ZeRO-3, a shard each, gathered first): the main one writes them, the others
    wait until they are there."""
    state_dict = distributed.full_state_dict(model)
    if distributed.is_main():
        if lora is None:
            from alignment.models.loading import save_pretrained

            save_pretrained(model, tokenizer, out, state_dict)
        else:
            from alignment.models.lora import save_adapter

            save_adapter(model, tokenizer, out, merge=lora.merge_on_save)
    distributed.barrier()


def reward_model_path(paths: Paths, name: str) -> Path:
    """`rm`: the pipeline's reward model; anything else a path (relative to the project root) or hub id."""
    return paths.rm if name == "rm" else paths.resolve(name)


def reward_scorer(paths: Paths, name: str | None, max_length: int, compute=None):
    """The reward model `name` names as a scorer, batched and in the dtype of `compute` (a ComputeConfig);
    None: no reward model, None back."""
    if name is None:
        return None
    from alignment.config import ComputeConfig
    from alignment.models.reward_model import RewardScorer
    from alignment.precision import resolve_dtype

    compute = compute or ComputeConfig()
    return RewardScorer(
        reward_model_path(paths, name),
        max_length=max_length,
        batch_size=compute.scoring_batch_size,
        dtype=resolve_dtype(compute.dtype),
        device=distributed.device(),
    )


def gold_reward(paths: Paths):
    """The IMDb gold scorer as a reward, (prompts, responses, finished) -> scores, on prompt + response."""
    from alignment.evaluation.gold_scorer import GoldScorer

    gold = GoldScorer.load(paths.gold)
    return lambda p, r, f: gold.reward([a + b for a, b in zip(p, r)])


def held_out_judges(paths: Paths, reward, source: str = "imdb", code=None, tokenizer=None) -> dict:
    """The judges every policy stage compares with SFT by, each (prompts, responses, finished) -> scores:
    on the IMDb task the gold scorer (its held-out judge, which nothing trains against) on prompt +
    response; the reward model `reward` (the proxy; None: none), which closes finished responses with
    EOS; with `code` (a RewardSource) each of its functions by name (e.g. exact_match: accuracy) and
    their weighted sum `code`, on the responses re-tokenized by `tokenizer`. Other tasks (HH dialogue)
    have no gold: the evaluate stage's LLM judge is their held-out judge."""
    judges = {"gold": gold_reward(paths)} if source == "imdb" else {}
    if reward is not None:
        judges["rm"] = lambda p, r, f: reward(p, r, f).numpy()
    if code is not None:
        judges |= code.judges(tokenizer)
    return judges


def score_samples(reward, prompts: list[str], drawn: list, tokenizer, model=None) -> list[float]:
    """Sampled (prompt ids, response ids) of `generate_ids` scored by `reward` (a `stage_reward`): a
    reward computed by code gets the sampled ids themselves. `model`: the one that drew them (its
    generation config names further end ids, `generation.ended`)."""
    from alignment.models.generation import decode_responses, ended
    from alignment.rewards.source import RewardSource

    texts, finished = decode_responses(tokenizer, drawn), ended(tokenizer, drawn, model)
    if isinstance(reward, RewardSource):
        return reward.score(prompts, texts, [ids for _, ids in drawn], finished).totals
    return [float(x) for x in reward(prompts, texts, finished)]


def stage_reward(cfg, paths: Paths, rm):
    """What a stage's samples are scored by (`cfg.reward`): rm, the reward model `rm`; gold, the gold
    scorer on prompt + response; code, the functions of `cfg.rewards` (imported now: a wrong path fails
    before any compute), with the RM and the gold scorer as terms where it names them."""
    if cfg.reward == "rm":
        return rm
    if cfg.reward == "gold":
        return gold_reward(paths)
    from alignment.rewards.source import RewardSource

    terms = {f.function for f in cfg.rewards.functions}
    models = {"rm": rm} if "rm" in terms else {}
    if "gold" in terms:
        models["gold"] = gold_reward(paths)
    return RewardSource.from_config(cfg.rewards, models)


def compare_on_held_out(
    policy,
    reference,
    tokenizer,
    paths: Paths,
    cfg,
    reward,
    seed: int,
    split: str = "test",
    out: Path | None = None,
    code=None,
) -> tuple[dict[str, float], list[dict]]:
    """Policy vs SFT on `cfg.eval_prompts` prompts of `split` (`cfg.source`), judged by gold, the RM
    `reward` and the functions of `code` (a RewardSource); the per-prompt rows go to
    `out/held_out_generations.jsonl` when `out` is given."""
    from alignment.data.prompts import load_prompts
    from alignment.evaluation.heldout import compare_to_sft

    prompts = load_prompts(paths, split, cfg.source, cfg.eval_prompts, tokenizer)
    judges = held_out_judges(paths, reward, cfg.source, code, tokenizer)
    with sharding.gathered(policy, reference):  # whole on every process (FSDP2): each samples its own block
        metrics, rows = compare_to_sft(
            policy, reference, tokenizer, prompts, cfg.samples, seed, judges, cfg.compute
        )
    if out is not None and distributed.is_main():
        write_jsonl(out / "held_out_generations.jsonl", rows)
    return metrics, rows


def held_out_summary(metrics: dict[str, float]) -> str:
    """A policy's held-out numbers against SFT in one line, every judge's (gold, rm, code rewards)."""
    judges = [key.removesuffix("/sft_reward") for key in metrics if key.endswith("/sft_reward")]
    parts = [
        f"{j} reward {metrics[f'{j}/reward']:.3f} vs SFT {metrics[f'{j}/sft_reward']:.3f} "
        f"(win rate {metrics[f'{j}/win_rate_vs_sft']:.2f})"
        for j in judges
    ]
    return ", ".join(parts) + f"; KL {metrics['objective/kl']:.2f} nats"


def log_held_out(name: str, metrics: dict[str, float]) -> None:
    logger.info("held-out %s: %s", name, held_out_summary(metrics))


def run_online(
    name: str,
    cfg,
    paths: Paths,
    log,
    method,
    settings,
    reward,
    rm,
    *,
    critic=None,
    policy_and_reference=None,
    columns: list[str],
    panels: list[list[str]],
    label: str,
) -> dict[str, float]:
    """An online-RL stage (PPO, GRPO, RLOO) from the SFT policy, in numbered steps: `method` and `settings`
    on the shared loop (alignment/training/online.py), the samples scored by `reward`, the held-out
    comparison judged by `rm` (and gold, and by a reward computed by code, its functions). The prompts
    carry their rows' columns (`PromptRow`) for a reward computed by code. `policy_and_reference`: the
    stage's own (tokenizer, policy, reference), e.g. PPO's with a value head on the policy."""
    from alignment.data.prompts import load_prompts
    from alignment.models.loading import check_max_length
    from alignment.plots import curves
    from alignment.rewards.source import RewardSource
    from alignment.stages.results import finish
    from alignment.training import online
    from alignment.training.checkpoint import fingerprint

    # step 1. policy, reference, prompts
    loaded = policy_and_reference or load_policy_and_reference(
        paths.sft, cfg.lora, cfg.train.seed, run_dtype(cfg)
    )
    tokenizer, policy, reference = loaded
    check_max_length(cfg.max_length, policy, f"{name}.max_length")
    prompts = load_prompts(paths, "train", cfg.source, cfg.train_prompts, tokenizer)
    logger.info(
        "%s: %d batches of %d prompts x %d samples (all processes), %d pass(es) over each",
        label,
        settings.batches,
        settings.prompts_per_batch * distributed.world(),
        settings.samples_per_prompt,
        settings.passes,
    )

    # step 2. generation batches on the shared loop
    history, timing = online.train(
        policy,
        reference,
        reward,
        tokenizer,
        prompts,
        settings,
        method,
        paths.checkpoints(name),
        fingerprint(name, cfg, paths.root),
        critic=critic,
        log_metrics=log.metrics if log else None,
        desc=name,
    )
    logger.info(
        "generation %.0f s, training %.0f s", timing["generation_seconds"], timing["training_seconds"]
    )

    # step 3. save, then policy vs SFT on held-out prompts
    out = paths.out(name)
    save_model(policy, tokenizer, out, cfg.lora)
    code = reward if isinstance(reward, RewardSource) else None
    held_out, rows = compare_on_held_out(
        policy, reference, tokenizer, paths, cfg, rm, cfg.train.seed, out=out, code=code
    )
    log_held_out(label, held_out)

    # step 4. metrics, plots, registration
    functions = [key for key in history[-1] if key.startswith("rewards/")]  # a reward computed by code
    return finish(
        name,
        paths,
        log,
        online.summary(history, timing) | held_out,
        csvs={"train.csv": (history, columns + functions)},
        curves=(held_out, len(history)),
        figures={
            f"plots/{name}.png": curves(history, f"{label} per generation batch", panels, "generation batch")
        },
        tables={"held_out_generations.json": rows[: cfg.samples.num_prompts]},
        model=out,
        register_as=cfg.register_as,
    )


GROUP_COLUMNS = [
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
GROUP_PANELS = [["reward"], ["objective/kl", "entropy"]]
