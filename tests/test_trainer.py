"""The shared training loop: prompt masking, the accumulation invariant and exact resume."""

import pytest
import torch

from alignment.batching import collate, encode
from alignment.config import ModelConfig, TrainConfig
from alignment.losses import IGNORE_INDEX
from alignment.models import build_model, train_tokenizer
from alignment.trainer import count_response_tokens, train, window_indices
from alignment.trainer import nll_step as step

TEXTS = [
    ("The film was", " a joy from start to finish, and the cast shines."),
    ("\n\nHuman: What is two plus two?\n\nAssistant:", " Four."),
    ("I hated", " every minute of it; the plot made no sense at all."),
    ("\n\nHuman: Name a colour.\n\nAssistant:", " Blue, like the sky on a clear day."),
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((p + r for p, r in TEXTS), vocab_size=300, min_frequency=1)


def tiny_model(tokenizer, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_position_embeddings=64, dropout=dropout)
    return build_model(cfg, tokenizer)


def examples(tokenizer):
    return [encode(tokenizer, p, r, max_length=64, finished=True) for p, r in TEXTS]


def run(tokenizer, cfg: TrainConfig, model=None, **kwargs):
    model = model or tiny_model(tokenizer)
    result = train(
        model,
        examples(tokenizer),
        collate(tokenizer.pad_token_id),
        step,
        count_response_tokens,
        cfg,
        **kwargs,
    )
    return model, result


def test_prompt_tokens_carry_no_loss(tokenizer):
    prompt, response = TEXTS[1]
    example = encode(tokenizer, prompt, response, max_length=64, finished=True)
    n_prompt = len(tokenizer(prompt).input_ids)
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the response ends with EOS
    assert tokenizer.decode(example["input_ids"][n_prompt:-1]) == response


def test_overlong_examples_keep_the_latest_prompt_and_some_response(tokenizer):
    prompt, response = "\n\nHuman: " + "blah " * 100 + "\n\nAssistant:", " A reply."
    example = encode(tokenizer, prompt, response, max_length=32, finished=True)
    assert len(example["input_ids"]) == 32
    assert tokenizer.decode(example["input_ids"]).endswith("Assistant: A reply.<|endoftext|>")


def test_windows_are_a_pure_function_of_seed_and_epoch():
    assert window_indices(10, 2, 2, seed=1, epoch=0) == window_indices(10, 2, 2, seed=1, epoch=0)
    assert window_indices(10, 2, 2, seed=1, epoch=0) != window_indices(10, 2, 2, seed=1, epoch=1)
    windows = window_indices(10, 2, 2, seed=1, epoch=0)
    assert len(windows) == 2 and all(len(w) == 4 for w in windows)  # the incomplete window is dropped


def test_batch_8_x_accumulation_1_equals_batch_1_x_accumulation_8(tokenizer):
    """Token-normalised accumulation: the same examples make the same update however they are split
    (examples differ in length, so a per-micro-batch mean would fail this)."""
    base = dict(
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_schedule="constant",
        max_grad_norm=None,
        log_every=1,
    )
    big, big_result = run(tokenizer, TrainConfig(batch_size=8, grad_accum=1, **base))
    small, small_result = run(tokenizer, TrainConfig(batch_size=1, grad_accum=8, **base))
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in big_result.history] == pytest.approx(
        [r["loss"] for r in small_result.history], rel=1e-5
    )
    # and the training really moved the weights
    assert not torch.allclose(next(big.parameters()), next(tiny_model(tokenizer).parameters()))


class Killed(Exception):
    pass


def test_stopped_and_resumed_run_ends_with_the_same_weights(tokenizer, tmp_path):
    """Killed after step 5 with the last checkpoint at step 4: resuming redoes step 5 and goes on.
    Dropout is on, so the RNG state must come back too; two epochs cross an epoch boundary."""
    cfg = TrainConfig(
        batch_size=2,
        grad_accum=2,
        epochs=2,
        max_steps=7,
        checkpoint_every=2,
        learning_rate=5e-3,
        warmup_steps=2,
        log_every=1,
    )
    straight, straight_result = run(tokenizer, cfg, model=tiny_model(tokenizer, dropout=0.2))

    def kill_after_5(done: int) -> None:
        if done == 5:
            raise Killed

    with pytest.raises(Killed):
        run(
            tokenizer,
            cfg,
            model=tiny_model(tokenizer, dropout=0.2),
            checkpoint_dir=tmp_path,
            fingerprint="a",
            on_step=kill_after_5,
        )
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000004"]
    resumed, result = run(
        tokenizer, cfg, model=tiny_model(tokenizer, dropout=0.2), checkpoint_dir=tmp_path, fingerprint="a"
    )
    assert result.resumed_from == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the curves logged before the kill come back with the checkpoint: the report covers every step
    assert [r["step"] for r in result.history] == list(range(1, 8))
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight_result.history]


def test_a_checkpoint_of_other_settings_is_not_resumed(tokenizer, tmp_path):
    cfg = TrainConfig(batch_size=4, max_steps=2, checkpoint_every=1, log_every=1)
    run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="a")
    _, result = run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="b")
    assert result.resumed_from == 0
    _, result = run(tokenizer, cfg, checkpoint_dir=tmp_path, fingerprint="b")  # b's own checkpoint
    assert result.resumed_from == 2


def test_too_little_data_for_one_step_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        run(tokenizer, TrainConfig(batch_size=64))
