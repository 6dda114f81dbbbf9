"""sft: supervised fine-tuning on {prompt, response} with the loss on response tokens only."""

from __future__ import annotations

import logging
import math
from itertools import zip_longest

import torch

from alignment import precision
from alignment.config import SFTConfig
from alignment.data.batching import collate, encode
from alignment.data.chat import render_row
from alignment.data.io import read_jsonl, write_jsonl
from alignment.losses.logprobs import sft_loss
from alignment.models.generation import generate
from alignment.models.loading import build_model, load_tokenizer
from alignment.paths import Paths
from alignment.plots import loss_curve
from alignment.stages.common import save_model
from alignment.stages.results import finish
from alignment.tracking import Tracker
from alignment.training import distributed, sharding
from alignment.training.checkpoint import fingerprint as checkpoint_fingerprint
from alignment.training.trainer import count_response_tokens, nll_step, train

logger = logging.getLogger(__name__)


def evaluation(examples: list[dict], pad: callable, batch_size: int):
    """Token-weighted mean NLL of the eval responses, and its perplexity."""

    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        nll, tokens = 0.0, 0.0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad(examples[start : start + batch_size]).items()}
            nll_sum, n = sft_loss(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )
            nll, tokens = nll + nll_sum.item(), tokens + n.item()
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return evaluate


def sample_prompts(rows: list[dict], n: int) -> list[str]:
    """n distinct prompts, taking from each source in turn so every task shows up."""
    by_source: dict[str, list[str]] = {}
    for row in rows:
        if row["prompt"] not in by_source.setdefault(row["source"], []):
            by_source[row["source"]].append(row["prompt"])
    interleaved = [p for group in zip_longest(*by_source.values()) for p in group if p is not None]
    return interleaved[:n]


def run(cfg: SFTConfig, paths: Paths, log: Tracker | None) -> dict[str, float]:
    tokenizer = load_tokenizer(paths.tokenizer)
    # conversations through the tokenizer's chat template (chat.py); the data's answers are finished
    train_rows = [render_row(tokenizer, r) for r in read_jsonl(paths.data / "sft_train.jsonl")]
    eval_rows = [render_row(tokenizer, r) for r in read_jsonl(paths.data / "sft_eval.jsonl")]
    eval_rows = eval_rows[: cfg.eval_max_examples]
    torch.manual_seed(cfg.train.seed)  # the initial weights of a model built from a config
    model = build_model(cfg.model, tokenizer)
    if cfg.lora is not None:
        from alignment.models.lora import add_adapter  # peft: imported only for a LoRA run

        model = add_adapter(model, cfg.lora, cfg.train.seed)
    logger.info(
        "model: %.2fM parameters, %d train / %d eval examples",
        model.num_parameters() / 1e6,
        len(train_rows),
        len(eval_rows),
    )

    train_examples = [encode(tokenizer, r["prompt"], r["response"], cfg.max_length, True) for r in train_rows]
    eval_examples = [encode(tokenizer, r["prompt"], r["response"], cfg.max_length, True) for r in eval_rows]
    pad = collate(tokenizer.pad_token_id)
    fingerprint = checkpoint_fingerprint("sft", cfg, paths.root)
    result = train(
        model,
        train_examples,
        pad,
        nll_step,
        count_response_tokens,
        cfg.train,
        checkpoint_dir=paths.checkpoints("sft"),
        fingerprint=fingerprint,
        evaluate=evaluation(eval_examples, pad, cfg.train.batch_size),
        log_metrics=log.metrics if log else None,
    )

    save_model(model, tokenizer, paths.sft, cfg.lora)
    prompts = sample_prompts(eval_rows, cfg.samples.num_prompts)
    s = cfg.samples
    # whole on every process (FSDP2): each samples on its own, at the run's precision
    with sharding.gathered(model), precision.autocast(precision.resolve_dtype(cfg.compute.dtype)):
        responses = (
            generate(
                model,
                tokenizer,
                prompts,
                s.max_new_tokens,
                s.temperature,
                s.top_p,
                batch_size=cfg.compute.generation_batch_size,
            )
            if prompts
            else []
        )
    generations = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    if distributed.is_main():
        write_jsonl(paths.sft / "generations.jsonl", generations)

    final_eval = result.eval_history[-1]
    metrics = {
        "train/loss": result.history[-1]["loss"],
        "eval/loss": final_eval["loss"],
        "eval/perplexity": final_eval["perplexity"],
        "steps": result.steps,
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "parameters": model.num_parameters(),
    }
    for row in generations[:4]:
        logger.info("sample: %r -> %r", row["prompt"][-60:], row["response"][:120])
    return finish(
        "sft",
        paths,
        log,
        metrics,
        csvs={
            "train.csv": (result.history, ["step", "loss", "learning_rate", "grad_norm"]),
            "eval.csv": (result.eval_history, ["step", "loss", "perplexity"]),
        },
        figures={"plots/sft_loss.png": loss_curve(result.history, result.eval_history, "SFT loss")},
        tables={"generations.json": generations},
        model=paths.sft,
        register_as=cfg.register_as,
    )
