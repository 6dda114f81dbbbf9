"""Training throughput of the pipeline's own SFT and DPO steps: steps/s, tokens/s and, on a GPU, MFU; and
(`--view memory`) the peak memory and tokens/s of sampling and scoring at a given vocabulary, length and
batch, with the code before and after logits were cut to the positions that need them.

    python -m alignment.bench --stage dpo --model gpt2:4x256 --batch-size 8 --max-length 256 --steps 20
    python -m alignment.bench --stage dpo --model gpt2:4x256 --padding-free --device cuda --dtype bf16
    python -m alignment.bench --view memory --model qwen2:2x64 --vocab-size 151936 --max-length 640 \
        --batch-size 16 --new-tokens 64

It runs the shared training loop (alignment/training/trainer.py) with the stage's collate and step, DPO
with its
reference log-probs precomputed, on real HH-RLHF pairs (the embedded copy) and a BPE tokenizer trained
on them, so it measures what `dvc repro` runs. tokens/s counts the real tokens of the sequences a step
trains on (prompt + response of each chosen and rejected row), whatever the layout: padded and
padding-free runs of the same data count the same tokens. MFU = 6 * parameters * tokens/s / peak.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import time
from pathlib import Path

import torch

from alignment.config import DPOConfig, ModelConfig, TrainConfig
from alignment.data.batching import collate, encode
from alignment.data.preference_data import collate_pairs, encode_pair
from alignment.data.sources import split_hh_transcript
from alignment.models.loading import build_model, load_causal_lm, load_tokenizer, train_tokenizer
from alignment.stages import dpo
from alignment.training.trainer import count_response_tokens, example_length, nll_step, train, window_indices

HH_PAIRS = Path(__file__).resolve().parent.parent / "data" / "embedded" / "hh_pairs.jsonl.gz"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per GPU, from the datasheets


def hh_pairs(path: Path) -> list[dict]:
    """{prompt, chosen, rejected} of every HH transcript pair that shares its prompt."""
    pairs = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        chosen, rejected = split_hh_transcript(row["chosen"]), split_hh_transcript(row["rejected"])
        if chosen and rejected and chosen[0] == rejected[0]:
            pairs.append({"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]})
    return pairs


def model_and_tokenizer(spec: str, pairs: list[dict], vocab_size: int):
    """`gpt2:LAYERSxWIDTH` (heads of 64 dims) or `llama:LAYERSxWIDTH`: a fresh model over a BPE trained
    on the pairs; anything else: a local model folder with its tokenizer."""
    arch, _, size = spec.partition(":")
    if arch not in ("gpt2", "llama") or "x" not in size:
        return load_causal_lm(spec), load_tokenizer(spec)
    layers, width = (int(n) for n in size.split("x"))
    tokenizer = train_tokenizer((p["prompt"] + p["chosen"] for p in pairs), vocab_size, 2)
    cfg = ModelConfig(arch=arch, n_layer=layers, n_embd=width, n_head=max(1, width // 64))
    return build_model(cfg, tokenizer), tokenizer


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None or device != "cuda":
        return given
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def stage_parts(args, model, tokenizer, pairs: list[dict]):
    """(examples, collate, step, count) of the stage as the pipeline builds them."""
    if args.stage == "sft":
        examples = [encode(tokenizer, p["prompt"], p["chosen"], args.max_length, True) for p in pairs]
        return examples, collate(tokenizer.pad_token_id), nll_step, count_response_tokens
    examples = [encode_pair(tokenizer, p, args.max_length) for p in pairs]
    dpo.precompute_reference(copy.deepcopy(model).eval(), examples, collate_pairs(tokenizer.pad_token_id), 64)
    collate_fn = dpo.collate_with_reference(tokenizer.pad_token_id, args.padding_free, args.capacity)
    return examples, collate_fn, dpo.make_step(None, DPOConfig()), dpo.pairs_in


def timed_windows(tokens: list[int], args) -> list[list[int]]:
    """The example indices of each timed step, in the trainer's order (seed 0, one process)."""
    n, group = len(tokens), args.group_by_length
    per_epoch = len(window_indices(n, args.batch_size, 1, 0, 0))
    steps = range(args.warmup, args.warmup + args.steps)
    return [
        window_indices(n, args.batch_size, 1, 0, i // per_epoch, tokens, group)[i % per_epoch] for i in steps
    ]


def bench(args) -> dict:
    torch.manual_seed(0)
    pairs = hh_pairs(args.data)
    model, tokenizer = model_and_tokenizer(args.model, pairs, args.vocab_size)  # BPE on every pair
    pairs = pairs[: args.pairs]
    model.to(args.device)
    examples, collate_fn, step, count = stage_parts(args, model, tokenizer, pairs)
    tokens = [example_length(example) for example in examples]  # real tokens: a pair's both rows
    precision = "bf16" if args.dtype == "bf16" else "no"
    device = "cpu" if args.device == "cpu" else "auto"

    cfg = TrainConfig(
        batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        mixed_precision=precision,
        device=device,
        resume=False,
        log_every=args.warmup + args.steps,
        group_by_length=args.group_by_length,
    )
    ended = []  # the clock at each optimizer step's end; the warmup steps (allocator, caches) are not timed

    def clock(done: int) -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()
        ended.append(time.perf_counter())

    train(model, examples, collate_fn, step, count, cfg, on_step=clock)
    seconds = ended[-1] - ended[args.warmup - 1]
    real_tokens = sum(tokens[i] for window in timed_windows(tokens, args) for i in window)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "stage": args.stage,
        "model": args.model,
        "parameters": params,
        "padding_free": args.padding_free,
        "group_by_length": args.group_by_length,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "steps_per_second": round(args.steps / seconds, 4),
        "tokens_per_step": round(real_tokens / args.steps, 1),
        "tokens_per_second": round(real_tokens / seconds, 1),
    }
    peak = peak_tflops(args.device, args.peak_tflops)
    if peak:
        result["mfu"] = round(6 * params * real_tokens / seconds / (peak * 1e12), 4)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alignment.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--view", choices=("training", "memory"), default="training")
    parser.add_argument("--new-tokens", type=int, default=64, help="memory view: sampled tokens per row")
    parser.add_argument("--stage", choices=("sft", "dpo"), default="dpo")
    parser.add_argument("--model", default="gpt2:4x256", help="gpt2:LxW, llama:LxW or a path")
    parser.add_argument("--vocab-size", type=int, default=4096, help="of the BPE trained for a fresh model")
    parser.add_argument("--batch-size", type=int, default=8, help="SFT rows or DPO pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--padding-free", action="store_true", help="DPO: packed pairs (dpo.padding_free)")
    parser.add_argument("--capacity", type=int, default=512, help="padding-free: tokens per packed row")
    parser.add_argument(
        "--group-by-length", type=int, default=None, metavar="K", help="length-grouped runs of K windows"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU peak; default: by GPU name")
    parser.add_argument("--data", type=Path, default=HH_PAIRS)
    parser.add_argument("--pairs", type=int, default=None, help="the first N pairs only (default: all)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the timed steps start at the end of one")
    if args.padding_free and args.stage != "dpo":
        parser.error("--padding-free applies to --stage dpo")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.view == "memory":
        from alignment.bench_memory import memory_view

        for row in memory_view(args):
            print(json.dumps(row))
        return
    print(json.dumps(bench(args)))


if __name__ == "__main__":
    main()
