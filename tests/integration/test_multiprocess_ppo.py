"""PPO as several processes, where their response tokens differ in number. The stage's run on micro params
(tests/integration/test_multiprocess.py: 2 processes x rollout_batch_size r/2 and minibatch_size m/2 train
the weights of 1 process x r, m) samples responses that never end before max_new_tokens, so every process
holds as many response tokens as the other; a tiny policy that ends its responses early checks the token
weighting of the losses and statistics across processes, with the value head on the policy (one
transformer under one DDP wrapper)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from launching import max_abs_difference, relative_difference

from alignment.config import ModelConfig
from alignment.models.loading import (
    build_model,
    load_causal_lm,
    load_tokenizer,
    save_pretrained,
    train_tokenizer,
)
from alignment.stages import ppo
from alignment.training import online
from alignment.training.online_methods import PPO, ppo_settings
from flows.config import parse

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
WORDS = ["good", "bad", "fine", "dull", "great", "poor", "nice", "odd"]
PROMPTS = [f"{w} {v}" for w in WORDS for v in WORDS[:4]]


@contextmanager
def one_thread() -> Iterator[None]:
    """As each process of `launch` runs: the same kernels, so the same rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_policy(folder: Path) -> None:
    """A 1-layer LM taught for a moment that a sequence of 3 to 8 words ends with EOS."""
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=32), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eos = tokenizer.eos_token_id
    for _ in range(40):
        rows = [
            tokenizer(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(n),)))).input_ids + [eos]
            for n in torch.randint(3, 9, (16,))
        ]
        width = max(map(len, rows))
        ids = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_pretrained(model, tokenizer, folder)


def train_tiny(folder: Path, rollout_batch_size: int, minibatch_size: int) -> tuple[list[dict], dict]:
    """PPO on the tiny policy with a value head, rewarding length: (history, the policy's weights)."""
    tokenizer, policy = load_tokenizer(folder), load_causal_lm(folder)
    reference = load_causal_lm(folder).eval().requires_grad_(False)
    cfg = parse(
        "ppo",
        {
            "max_new_tokens": 4,
            "max_length": 32,
            "rollouts": 3,
            "rollout_batch_size": rollout_batch_size,
            "minibatch_size": minibatch_size,
            "ppo_epochs": 2,
            "critic_init": "policy_head",
            "train": {"learning_rate": 3e-3, "critic_learning_rate": 3e-3, "checkpoint_every": None},
        },
    )

    def reward(prompts, texts, finished):
        return torch.tensor([len(text) / 10 for text in texts])

    critic = ppo.PolicyValueHead(policy)
    history, _ = online.train(
        policy, reference, reward, tokenizer, PROMPTS, ppo_settings(cfg), PPO(cfg), None, "", critic=critic
    )
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    # The key bias adds q.b to every score of a query: softmax ignores it, its gradient is 0 but for
    # rounding, and Adam scales rounding noise up to steps of the learning rate. Left out of the comparison.
    state["transformer.h.0.attn.c_attn.bias"][16:32] = 0
    return history, state


_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from alignment.training import distributed
    from test_multiprocess_ppo import train_tiny

    history, state = train_tiny(Path(sys.argv[1]), 4, 2)
    if distributed.is_main():
        torch.save({"history": history, "state": state}, sys.argv[2])
    """
)


def test_unequal_response_lengths_weigh_each_process_by_its_tokens(tmp_path):
    tiny_policy(tmp_path / "lm")
    with one_thread():
        history, state = train_tiny(tmp_path / "lm", 8, 4)
    # some responses ended early, some did not: the two processes hold unequal token counts
    assert 0 < history[0]["val/num_eos_tokens"] < 8

    (tmp_path / "worker.py").write_text(_WORKER)
    tests = str(Path(__file__).parent)  # the worker imports train_tiny from here
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(tmp_path / "worker.py")]
    done = subprocess.run(
        [*command, str(tmp_path / "lm"), str(tmp_path / "two.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-8000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)

    print(
        f"tiny ppo: relative {relative_difference(state, two['state']):.2e}, "
        f"max abs {max_abs_difference(state, two['state']):.2e}"
    )
    assert relative_difference(state, two["state"]) < 1e-5
    assert max_abs_difference(state, two["state"]) < 1e-5
    for row, other in zip(history, two["history"], strict=True):  # statistics of the whole rollout
        for key, value in row.items():
            assert math.isclose(value, other[key], rel_tol=1e-4, abs_tol=1e-6), (key, value, other[key])
