"""Conversations end to end on SmolLM2's real tokenizer and model: HH transcripts as messages, the chat
template and the response mask, the sampler's ids trained on as sampled, EOS only on finished answers,
and conversational data in the hub's schemas read from local files."""

import gzip
import json

import pytest
import torch

from alignment.config import PrepareConfig, Source
from alignment.data.batching import collate, encode, prompt_ids
from alignment.data.chat import hh_messages, render_prompt, render_row
from alignment.data.io import DataError
from alignment.data.sources import prepare
from alignment.losses.logprobs import IGNORE_INDEX
from tests.conftest import ROOT

HH = ROOT / "data" / "embedded" / "hh_pairs.jsonl.gz"


def multi_turn_hh_pair() -> dict:
    with gzip.open(HH, "rt") as f:
        rows = [json.loads(line) for line in f]
    return next(r for r in rows if r["chosen"].count("\n\nHuman:") >= 3)


def prepared_hh_pair(tmp_path) -> dict:
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(multi_turn_hh_pair()) + "\n")
    cfg = PrepareConfig(
        eval_fraction=0.0,
        test_fraction=0.0,
        max_chars=10**6,
        sources=(Source(name="hh", kind="hh", path=str(path)),),
    )
    return prepare(cfg)[0]["preference"]["train"][0]


def test_hh_dialogue_renders_through_smollm2s_template_and_masks_only_the_reply(chat_tokenizer, tmp_path):
    tokenizer = chat_tokenizer
    pair = prepared_hh_pair(tmp_path)
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant"] * (len(pair["prompt"]) // 2) + [
        "user"
    ]
    row = render_row(tokenizer, pair)
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["prompt"].count("<|im_start|>user") >= 3
    assert row["chosen"] == pair["chosen"].lstrip()  # the assistant's content, no HH leading space

    example = encode(tokenizer, row["prompt"], row["chosen"], max_length=4096, finished=True)
    # the whole example is the template's own tokenization of the conversation with the reply (less the
    # newline the template writes after the closing <|im_end|>, which no model is trained to emit)
    whole = tokenizer.apply_chat_template(
        pair["prompt"] + [{"role": "assistant", "content": row["chosen"]}], tokenize=False
    )
    assert whole.endswith("<|im_end|>\n")
    assert example["input_ids"] == tokenizer(whole.removesuffix("\n")).input_ids
    # loss only on the reply and the <|im_end|> (SmolLM2's EOS) that closes it
    reply = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert reply[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(reply[:-1]) == row["chosen"]
    assert example["labels"][: len(prompt_ids(tokenizer, row["prompt"]))] == [IGNORE_INDEX] * len(
        prompt_ids(tokenizer, row["prompt"])
    )


def test_without_a_chat_template_a_conversation_is_the_hh_transcript_again(tmp_path):
    pair, original = prepared_hh_pair(tmp_path), multi_turn_hh_pair()
    assert render_prompt(None, pair["prompt"]) + pair["chosen"] == original["chosen"]
    assert hh_messages("no turns here") is None


def test_a_cut_response_is_scored_without_eos_and_a_finished_one_with_it(chat_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignment.models.reward_model import RewardScorer, sequence_rewards

    tokenizer = chat_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(tmp_path / "rm", max_length=128)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Say hello."}])
    cut, closed = (encode(tokenizer, prompt, "Hello", 128, finished=f) for f in (False, True))
    assert closed["input_ids"] == cut["input_ids"] + [tokenizer.eos_token_id]
    got = scorer([prompt, prompt], ["Hello", "Hello"], [False, True])
    batch = collate(tokenizer.pad_token_id)([cut, closed])
    with torch.no_grad():
        expected = sequence_rewards(scorer.model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, expected)
    assert got[0] != got[1]  # the RM sees where the answer stopped
    with pytest.raises(ValueError, match="2 prompts, 2 responses, 1 flags"):
        scorer([prompt, prompt], ["a", "b"], [True])


# ---------------------------------------------------------------- the hub's schemas, from local files
ULTRAFEEDBACK = {  # trl-lib/ultrafeedback_binarized / HuggingFaceH4/ultrafeedback_binarized
    "prompt": "What is 2 + 2?",
    "prompt_id": "abc",
    "chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "5."}],
    "score_chosen": 9.0,
    "score_rejected": 2.0,
}
TRL_PREFERENCE = {  # TRL's conversational preference format: the prompt apart, replies as assistant turns
    "prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    + [{"role": "user", "content": "Tell me a joke."}],
    "chosen": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
    "rejected": [{"role": "assistant", "content": "No."}],
}
TRL_SFT = {
    "messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}]
}


def hub_folder(tmp_path, name: str, rows: list[dict]):
    """A dataset laid out as a hub repository (data/train-00000-of-00001.parquet): read by the same
    `load_dataset(id, split=...)` call as a hub id."""
    import datasets

    folder = tmp_path / name
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return folder


def test_conversational_data_in_the_hubs_schemas_from_local_files(tmp_path):
    hh = multi_turn_hh_pair()
    (tmp_path / "hh.jsonl").write_text(
        json.dumps({"chosen": hh["chosen"], "rejected": hh["rejected"]}) + "\n"
    )
    (tmp_path / "trl.jsonl").write_text(json.dumps(TRL_PREFERENCE) + "\n")
    sources = (
        Source(
            name="ultrafeedback", kind="preference", path=str(hub_folder(tmp_path, "uf", [ULTRAFEEDBACK]))
        ),
        Source(name="trl", kind="preference", path=str(tmp_path / "trl.jsonl")),
        Source(name="hh", kind="hh", path=str(tmp_path / "hh.jsonl")),
        Source(name="sft", kind="sft", path=str(hub_folder(tmp_path, "sft", [TRL_SFT]))),
    )
    cfg = PrepareConfig(eval_fraction=0.0, test_fraction=0.0, max_chars=10**6, sources=sources)
    out, report = prepare(cfg)
    pairs = {row["source"]: row for row in out["preference"]["train"]}
    assert pairs["ultrafeedback"]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert (pairs["ultrafeedback"]["chosen"], pairs["ultrafeedback"]["rejected"]) == ("4.", "5.")
    assert pairs["trl"]["prompt"] == TRL_PREFERENCE["prompt"] and pairs["trl"]["rejected"] == "No."
    assert pairs["hh"]["prompt"][0]["role"] == "user"
    sft = next(row for row in out["sft"]["train"] if row["source"] == "sft")
    assert sft["prompt"] == TRL_SFT["messages"][:1] and sft["response"] == "Rome."
    assert all(counts["kept"] == 1 for counts in report["sources"].values())


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "no `content` string"),
        ({"chosen": [{"role": "user", "content": "q"}], "rejected": "b"}, "missing field 'prompt'"),
    ],
)
def test_malformed_messages_name_the_file_and_row(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n"
    )
    cfg = PrepareConfig(sources=(Source(name="bad", kind="preference", path=str(path)),))
    with pytest.raises(DataError, match=rf"bad.jsonl: (row|line) 2?.*{message}"):
        prepare(cfg)
