"""`python -m alignment.bench --view memory`: the peak memory and tokens/s of sampling and scoring at a
given vocabulary, length and batch, with the code before and after logits were cut to where they are needed.

- sampling: `batch_size` prompts of `max_length - new_tokens` tokens continued by `new_tokens` tokens
  (`generation.generate_ids`); `before`, the prefill forms logits at every prompt position, as the sampler
  did; `after`, at each row's last position alone;
- scoring: the summed log-probs of `batch_size` sequences of `max_length` tokens whose last `new_tokens`
  are the response; `before`, logits at every position and a float32 log-softmax over the whole
  vocabulary (the former `token_logps`); `after`, `scoring.response_token_logps`.

Each (task, code) runs in a fresh process, so that its peak is its own: on a CPU the peak resident set
during the task (VmHWM, reset as it starts) less the resident set before it (torch, the model and the
batch are already there), on a GPU torch's peak allocation less what was allocated before.
tokens/s counts the sampled tokens (sampling) or every token of the sequences (scoring). The model is
built from a config (`arch:LAYERSxWIDTH`) over a word-level tokenizer of `vocab_size` tokens:
its weights do not matter, its shapes do.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time

import torch
import torch.nn.functional as F

from alignment.config import ModelConfig
from alignment.losses.logprobs import IGNORE_INDEX

TASKS = ("sampling", "scoring")
CODES = ("before", "after")


def word_tokenizer(vocab_size: int):
    """A tokenizer of `vocab_size` words `w0 ... w{V-1}`, one id each: `w0` is EOS, `w1` padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w0", pad_token="w1", unk_token="w2")


def full_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The former scoring: every position's logits, then a vocabulary-wide float32 log-softmax."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logps = torch.gather(
        F.log_softmax(logits[:, :-1].float(), dim=-1), 2, labels.masked_fill(~mask, 0)[..., None]
    )
    return (logps.squeeze(-1) * mask).sum(-1)


def resident_bytes() -> int:
    """This process's resident set now (Linux's /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Start the peak resident set (VmHWM) again from the resident set now, so that a peak the set-up
    reached and gave back is not counted as the task's (Linux >= 4.0; False where it cannot)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes(reset: bool) -> int:
    """The peak resident set since `reset_peak_resident` (VmHWM), else since the process started."""
    if reset:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure(task: str, code: str, settings: dict, results) -> None:
    """One (task, code) in this fresh process: its peak memory above the set-up, and tokens/s."""
    from alignment.models import generation, scoring
    from alignment.models.loading import build_model

    torch.manual_seed(0)
    device = torch.device(settings["device"])
    vocab, length, new, rows = (settings[k] for k in ("vocab_size", "max_length", "new_tokens", "batch_size"))
    arch, _, size = settings["model"].partition(":")
    layers, width = (int(n) for n in size.split("x"))
    tokenizer = word_tokenizer(vocab)
    cfg = ModelConfig(arch=arch, n_layer=layers, n_embd=width, n_head=max(1, width // 32))
    cfg = cfg.model_copy(update={"max_position_embeddings": length + new + 8})
    dtype = torch.bfloat16 if settings["dtype"] == "bf16" else torch.float32
    model = build_model(cfg, tokenizer).to(device, dtype).eval()
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    if task == "sampling":
        prompts = [" ".join(f"w{i}" for i in row[: length - new].tolist()) for row in ids]
        if code == "before":  # the sampler as it was: no `logits_to_keep` at the prefill
            plain = generation.takes
            generation.takes = lambda model, keyword: keyword != "logits_to_keep" and plain(model, keyword)

        def run():  # random weights: a row ends early (drawing w0) with probability ~new_tokens / vocab
            generation.generate_ids(model, tokenizer, prompts, new, 1.0, batch_size=rows, seeds=range(rows))

        tokens = rows * new
    else:
        labels = ids.clone()
        labels[:, : length - new] = IGNORE_INDEX
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
        batch["labels"] = labels.to(device)

        def run():
            with torch.no_grad():
                (full_logps(model, batch) if code == "before" else scoring.response_token_logps(model, batch))

        tokens = rows * length
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_resident()
        before = resident_bytes()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_resident_bytes(reset) - before
    seconds = time.perf_counter() - started
    results.put(
        {
            "view": "memory",
            "task": task,
            "code": code,
            "model": settings["model"],
            "vocab_size": vocab,
            "max_length": length,
            "new_tokens": new,
            "batch_size": rows,
            "device": settings["device"],
            "dtype": settings["dtype"],
            "peak_mib": round(peak / 2**20, 1),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1),
        }
    )


def memory_view(args) -> list[dict]:
    """Every (task, code) of `args`, each in a process of its own."""
    settings = {
        key: getattr(args, key) for key in ("device", "dtype", "vocab_size", "max_length", "batch_size")
    }
    settings |= {"new_tokens": args.new_tokens, "model": args.model}
    if args.new_tokens >= args.max_length:
        raise ValueError(f"--new-tokens {args.new_tokens} must be below --max-length {args.max_length}")
    context, rows = multiprocessing.get_context("spawn"), []
    for task in TASKS:
        for code in CODES:
            results = context.Queue()
            process = context.Process(target=_measure, args=(task, code, settings, results))
            process.start()
            rows.append(results.get())
            process.join()
    return rows
