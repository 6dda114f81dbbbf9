"""The one training loop shared by the supervised-style stages: SFT, RM, DPO, BRAIn and ReST's Improve.

A stage supplies `step(model, batch) -> (loss_sum, metrics)`, where loss_sum is summed over the
batch's loss units (response tokens for SFT, pairs for DPO), and `count(batch) -> units`. The loop
divides every micro-batch's loss_sum by the unit count of the whole accumulation window (summed over
processes), so the update is the mean over the window whatever the split into micro-batches: batch 8
x accumulation 1 and batch 1 x accumulation 8 give the same step.

Exact resume: the data order is a pure function of (seed, epoch), and a checkpoint
(alignment/training/checkpoint.py) holds the model, optimizer, scheduler and every process's RNG
(alignment/training/engine.py: sharded under FSDP2), the step and a
stage's `extra_state` (BRAIn's samples); a run that is killed and resumed from its last checkpoint ends
with the same weights as one that never stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from alignment.config import OptimizerConfig, TrainConfig
from alignment.losses.logprobs import IGNORE_INDEX, sft_loss
from alignment.training import checkpoint, distributed
from alignment.training.distributed import reduce_mean
from alignment.training.engine import Engine

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
StepFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
# (get, set): a stage's own state, saved with every checkpoint and handed back on resume
ExtraState = tuple[Callable[[], dict], Callable[[dict], None]]


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged train step
    eval_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0


@contextmanager
def evaluating(*models) -> Iterator[None]:
    """The models in eval mode (no dropout) inside the block; their training flags restored after."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def window_indices(
    num_examples: int,
    micro_batch: int,
    accumulation: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
    group: int | None = None,
) -> list[list[int]]:
    """Example indices of each optimizer step of an epoch, in order; an incomplete last window is dropped.

    With `group` k (and each example's `lengths`): every run of k windows is sorted by length, longest
    first, and cut into windows again, and the windows of the epoch are shuffled, so that the examples of
    a micro-batch are of similar length. The same examples are trained on as without grouping, and the
    windows are the same for any number of processes with the same total batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    size = micro_batch * accumulation
    windows = [order[i : i + size] for i in range(0, num_examples - size + 1, size)]
    if group is None:
        return windows
    if lengths is None or len(lengths) != num_examples:
        raise ValueError("length-grouped windows need one length per example")
    grouped = []
    for start in range(0, len(windows), group):
        run = sorted(
            (i for window in windows[start : start + group] for i in window), key=lambda i: -lengths[i]
        )
        grouped += [run[i : i + size] for i in range(0, len(run), size)]
    return [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]


def example_length(example: dict) -> int:
    """The tokens of an encoded example: its input_ids, or those of its rows (a pair's chosen, rejected)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return sum(example_length(value) for value in example.values() if isinstance(value, dict))


def prepare_model(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.nn.Module:
    """`model` as a loop trains it, before accelerate wraps it: with `gradient_checkpointing` its layers
    recompute their activations in the backward pass; with `compile`, a torch.compile wrapper over it
    (same parameters, so the model is still trained in place). Both off: `model` itself."""
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        # under a frozen base (LoRA) no layer input needs a gradient: reentrant checkpointing would then
        # drop the adapters' gradients, hence peft's hook on the embeddings' output; non-reentrant (asked
        # for here) does not need it, but a model that ignores the kwargs might
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "peft_config"):
            model.enable_input_require_grads()
    return torch.compile(model) if cfg.compile else model


def schedule_name(cfg: TrainConfig) -> str:
    """transformers' name of the learning-rate schedule: its `constant` ignores warmup, so a constant
    schedule with warmup steps is `constant_with_warmup`."""
    if cfg.lr_schedule == "constant" and cfg.warmup_steps:
        return "constant_with_warmup"
    return cfg.lr_schedule


def make_optimizer(params: Iterable, cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at `cfg`'s learning rate and weight decay over `params` (parameters, or torch's parameter
    groups: dicts with "params" and their own "lr"), which train on `device`. `fused_adamw` auto: torch's
    fused kernel (one launch for every tensor) on a GPU, else the default implementation."""
    on_gpu = torch.device(device).type == "cuda"
    if cfg.fused_adamw == "on" and not on_gpu:
        raise ValueError(f"fused_adamw: on needs a GPU, but the parameters train on {device}")
    # fused None, not False, when off: torch's own default (foreach on a GPU), as before the knob
    fused = True if cfg.fused_adamw == "on" or (cfg.fused_adamw == "auto" and on_gpu) else None
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)


def train(
    model: torch.nn.Module,
    examples: Sequence[dict],
    collate: Callable[[list[dict]], Batch],
    step: StepFn,
    count: Callable[[Batch], torch.Tensor],
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    extra_state: ExtraState | None = None,
) -> TrainResult:
    """Train `model` in place on `examples`; see the module docstring for the contract.

    `on_start(step)` runs once before the first step (the step resumed from, or 0), after a resume has
    restored `extra_state`; `on_step(done)` runs after every optimizer step, before that step's
    checkpoint, so a checkpoint at step k holds the state after step k's refresh. `extra_state` is a
    `(get, set)` pair: `get()` returns a dict of tensors, numbers, strings, lists and dicts (loaded back
    with weights_only=True), the same on every process (the main process writes it). Under FSDP2 the
    model is sharded in place (alignment/training/engine.py) and stays so: gather it (`sharding.gathered`)
    to sample from it on each process's own prompts."""
    engine = Engine(cfg)
    world, rank = distributed.world(), distributed.rank()
    lengths = None
    if cfg.group_by_length is not None:
        lengths = [example_length(example) for example in examples]
        if not any(lengths):
            raise ValueError("train.group_by_length: these examples carry no input_ids to group by")
    windows_per_epoch = len(
        window_indices(len(examples), cfg.batch_size * world, cfg.grad_accum, cfg.seed, 0)
    )
    if windows_per_epoch == 0:
        raise ValueError(
            f"{len(examples)} examples are fewer than one optimizer step "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)"
        )
    total_steps = cfg.epochs * windows_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    model = engine.place(model)  # sharded under FSDP2, before the optimizer takes its parameters
    trained = prepare_model(model, cfg)  # shares `model`'s parameters: trained in place
    optimizer = make_optimizer(model.parameters(), cfg, engine.device)
    scheduler = get_scheduler(
        schedule_name(cfg), optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )
    wrapped, optimizer, scheduler = engine.prepare(trained, optimizer, scheduler)
    torch.manual_seed(cfg.seed)  # dropout and anything else drawn from the global RNG

    result = TrainResult(steps=0)
    if checkpoint_dir is not None and cfg.resume:
        loaded = _load_checkpoint(
            engine, checkpoint_dir, fingerprint, model, optimizer, scheduler, extra_state
        )
        result.resumed_from, result.history, result.eval_history = loaded
    if on_start is not None:
        on_start(result.resumed_from)
    progress = tqdm(  # one bar, the main process's
        total=total_steps,
        initial=result.resumed_from,
        desc="train",
        unit="step",
        mininterval=2.0,
        disable=not distributed.is_main(),
    )

    wrapped.train()
    started, tokens_seen, pending = time.perf_counter(), 0, []
    windows, windows_epoch = [], None  # the current epoch's windows, drawn once per epoch
    for step_index in range(result.resumed_from, total_steps):
        epoch, position = divmod(step_index, windows_per_epoch)
        if epoch != windows_epoch:
            windows, windows_epoch = (
                window_indices(
                    len(examples),
                    cfg.batch_size * world,
                    cfg.grad_accum,
                    cfg.seed,
                    epoch,
                    lengths,
                    cfg.group_by_length,
                ),
                epoch,
            )
        window = windows[position]
        mine = window[rank::world]  # this process's share of the window
        batches = [
            collate([examples[i] for i in mine[j : j + cfg.batch_size]])
            for j in range(0, len(mine), cfg.batch_size)
        ]
        # counted on the host before the move: no device sync (a GPU waits for nothing until a logged step)
        tokens_seen += sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
        batches = [{k: v.to(engine.device) for k, v in b.items()} for b in batches]

        # The window's unit count over all processes: every micro-batch is divided by it, and the gradient
        # mean over processes (DDP's, FSDP2's) is undone by the factor `world`. A window without a single
        # unit (every response cut away) trains on nothing: its loss is 0, not 0 / 0.
        units = engine.reduce_sum(sum(count(b) for b in batches).to(engine.device).float()).clamp(min=1.0)
        loss_total, metrics_total = torch.zeros((), device=engine.device), {}
        for index, batch in enumerate(batches):
            with engine.accumulating(wrapped, last=index == len(batches) - 1):
                loss_sum, metrics = step(wrapped, batch)
                engine.backward(loss_sum * world / units)
            loss_total += loss_sum.detach() / units
            for key, value in metrics.items():
                metrics_total[key] = metrics_total.get(key, 0.0) + value / len(batches)
        grad_norm = engine.clip_grad_norm_(wrapped, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step_index + 1
        pending.append({"loss": engine.reduce_sum(loss_total), "grad_norm": grad_norm, **metrics_total})
        progress.update(1)
        if done % cfg.log_every == 0 or done == total_steps:
            # the logged step's one host sync; the stage's metrics are means over the processes (each
            # process's share of a window is the same size)
            row = {key: float(sum(p[key] for p in pending)) / len(pending) for key in pending[0]}
            row = reduce_mean(row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            row |= {"learning_rate": scheduler.get_last_lr()[0], "step": done}
            elapsed = time.perf_counter() - started
            row["tokens_per_second"] = tokens_seen * world / elapsed if elapsed > 0 else 0.0
            result.history.append(row)
            if log_metrics:
                log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, done)
            pending = []
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
            _run_eval(evaluate, wrapped, model, done, result, log_metrics)
        if on_step is not None:
            on_step(done)
        if checkpoint_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            _save_checkpoint(
                engine, checkpoint_dir, fingerprint, done, result, model, optimizer, scheduler, extra_state
            )
    progress.close()

    if evaluate is not None:
        _run_eval(evaluate, wrapped, model, total_steps, result, log_metrics)
    result.steps = total_steps
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = tokens_seen * world / result.seconds if result.seconds > 0 else 0.0
    return result


def _run_eval(evaluate, wrapped, model, step: int, result: TrainResult, log_metrics) -> None:
    """`evaluate` on the model itself (not its DDP wrapper; under FSDP2 the sharded model, every process
    running the same passes)."""
    wrapped.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    wrapped.train()
    result.eval_history.append({"step": step, **metrics})
    if log_metrics:
        log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
    logger.info("step %d eval %s", step, {k: round(v, 4) for k, v in metrics.items()})


def _save_checkpoint(
    engine: Engine,
    checkpoint_dir: Path,
    fingerprint: str,
    step: int,
    result: TrainResult,
    model,
    optimizer,
    scheduler,
    extra_state: ExtraState | None,
) -> None:
    """The logged curves go along in the meta, so a resumed run reports them whole."""
    extra = extra_state[0]() if extra_state is not None else None

    def write(folder: Path) -> None:
        engine.save_state(folder, model, optimizer, scheduler, extra)

    meta = {"history": result.history, "eval_history": result.eval_history}
    checkpoint.save(checkpoint_dir, step, fingerprint, write, meta)


def _load_checkpoint(
    engine: Engine, checkpoint_dir: Path, fingerprint: str, model, optimizer, scheduler, extra_state
) -> tuple[int, list, list]:
    found = checkpoint.load(checkpoint_dir, fingerprint)
    if found is None:
        return 0, [], []
    folder, meta = found
    extra = engine.load_state(folder, model, optimizer, scheduler)
    if extra_state is not None:
        extra_state[1](extra)
    logger.info("resumed from %s (step %d)", folder, meta["step"])
    return meta["step"], meta.get("history", []), meta.get("eval_history", [])


def step_evaluation(
    examples: Sequence[dict], collate: Callable[[list[dict]], Batch], step: StepFn, batch_size: int
):
    """An `evaluate` for `train`: the stage's own `step` over `examples` in batches, without gradients;
    the loss per example and the step's metrics, averaged over the examples (every process runs every
    batch: under FSDP2 a forward is a collective)."""

    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        totals, n = {}, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            loss_sum, metrics = step(model, {k: v.to(device) for k, v in collate(chunk).items()})
            for key, value in {"loss": loss_sum.item() / len(chunk), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            n += len(chunk)
        return {key: value / n for key, value in totals.items()}

    return evaluate


def nll_step(model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """The step of SFT and of ReST's Improve: summed NLL of the response tokens (`count_response_tokens`
    normalises it over the accumulation window)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll_sum, _ = sft_loss(logits, batch["labels"])
    return nll_sum, {}


def count_response_tokens(batch: Batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
