"""The sentence-encoder family's hooks for the shared pipeline (``slimray.families.recipe.Recipe``).

MiniLM (or a local Hugging Face folder) is the teacher; its outputs on the train sentences (embeddings and the hidden
states the student imitates) are computed once and cached in ``RUN/cache/teacher.safetensors``. The student is the
teacher truncated to ``model.student_layers``, distilled on Ray Train (the family's ``EncoderTask``). A trial is one
head/FFN prune ratio: the pruned student is fine-tuned with KD, then every quantization is saved as an artifact and
scored at every inference sequence length, one row each (cosine to the teacher, neighbour recall, probe accuracy,
bytes on disk). Trials do not time: on 2 cores concurrent timings disturb each other, so the shared pipeline times
every candidate in the driver, one at a time. The quality constraint is probe accuracy within ``search.min_probe_ratio``
of the teacher's; a row must also keep ``search.min_cosine`` to the teacher (``admissible``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_np, save_file as save_np
from torch import nn

from slimray.compress.cpu import cpu_has_native_bf16, without_slow_bf16
from slimray.compress.measure import torch_threads
from slimray.families.recipe import Column, Quality, Recipe, StudentPlan
from slimray.families.sentence_encoder.compress import (
    count_params,
    prune_heads_ffn,
    sentences_per_s,
    timing_batches,
)
from slimray.families.sentence_encoder.data import split_by_article, split_jsonl, topic_names
from slimray.families.sentence_encoder.evaluate import quality
from slimray.families.sentence_encoder.kd import KDData, finetune_kd, target_layers, teacher_targets
from slimray.families.sentence_encoder.models import (
    QUANTIZE_AT_LOAD,
    artifact_bytes,
    build_float,
    copy_text_artifact,
    embed_texts,
    load_teacher,
    load_text_artifact,
    load_tokenizer,
    quantize_text,
    save_text_artifact,
    spec_for,
    teacher_config,
    teacher_dir,
    tokenize,
    truncated,
)
from slimray.runs import log
from slimray.schema import ConfigError


def load_sentences(data: Any) -> tuple[Any, Any, list[str], str]:
    """(train, held-out, label names, how it was split) for the config's data source."""
    if data.source == "jsonl":
        try:
            train, held, names = split_jsonl(
                data.path, text_field=data.text_field, label_field=data.label_field, group_field=data.group_field,
                heldout_fraction=data.heldout_fraction, seed=data.seed, max_train=data.max_train_sentences,
                max_heldout=data.max_heldout_sentences, min_words=data.min_words,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return train, held, names, f"by {data.group_field}" if data.group_field else "by text hash"
    train, held = split_by_article(
        heldout_fraction=data.heldout_fraction, seed=data.seed, max_train=data.max_train_sentences,
        max_heldout=data.max_heldout_sentences, min_words=data.min_words,
    )
    return train, held, topic_names(), "by article"


def teacher_cache(cfg: Any, teacher: nn.Module, tokenizer: Any, train_texts: list[str], held_texts: list[str],
                  path: Path) -> tuple[KDData, np.ndarray]:
    """The teacher's outputs on the train sentences (embeddings + hidden states) and its held-out embeddings, computed
    once and kept in ``path`` (a damaged file is recomputed)."""
    layers = target_layers(cfg.model.student_layers) if cfg.distill.hidden_weight > 0 else []
    if path.exists():
        try:
            t = load_np(str(path))
            kd = KDData(ids=t["ids"], lengths=t["lengths"], embeddings=t["embeddings"], offsets=t["offsets"],
                        hidden=[t[f"hidden{i}"] for i in range(len(layers))])
            log("teacher: reusing cached outputs")
            return kd, t["heldout_embeddings"]
        except (SafetensorError, KeyError, OSError) as err:
            log(f"teacher: {path} is damaged ({type(err).__name__}): recomputing it")
    log(f"teacher: embedding {len(train_texts)} train sentences once (+ hidden states of layers {layers}) and {len(held_texts)} held-out")
    with torch_threads(os.cpu_count() or 1):
        kd = teacher_targets(teacher, tokenizer, train_texts, max_seq_len=cfg.model.max_seq_len, hidden_layers=layers)
        held = embed_texts(teacher, tokenizer, held_texts, max_seq_len=cfg.model.max_seq_len)
    arrays = {"ids": kd.ids, "lengths": kd.lengths, "embeddings": kd.embeddings, "offsets": kd.offsets, "heldout_embeddings": held}
    arrays.update({f"hidden{i}": h for i, h in enumerate(kd.hidden)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_np(arrays, str(tmp))
    os.replace(tmp, path)
    return kd, held


def bf16_autocast(cfg: Any) -> bool:
    """bf16 autocast in training: asked for, or ``auto`` on a CPU with native bf16 (AVX512-BF16/AMX)."""
    mp = cfg.distill.mixed_precision
    return mp == "bf16" or (mp == "auto" and cpu_has_native_bf16())


def searched_quantizations(cfg: Any) -> tuple[list[str], str | None]:
    """The quantizations the search scores, and why bf16 was left out (a CPU without native bf16, where it is ~20x
    slower than fp32), if it was."""
    return without_slow_bf16(list(cfg.search.quantizations))


def _embed_at(model: nn.Module, tokenizer: Any, texts: list[str], seq_len: int, full: dict[str, np.ndarray], tag: str) -> np.ndarray:
    """Embeddings at ``seq_len``: texts no longer than ``seq_len`` tokens reuse the longest setting's embeddings (the
    same tokens); only the truncated ones are recomputed."""
    if tag not in full:
        full[tag] = embed_texts(model, tokenizer, texts, max_seq_len=seq_len)
        return full[tag]
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts))])
    out = full[tag].copy()
    redo = np.flatnonzero(lengths > seq_len)
    if len(redo):
        out[redo] = embed_texts(model, tokenizer, [texts[i] for i in redo], max_seq_len=seq_len)
    return out


class EncoderRecipe(Recipe):
    quality = Quality(key="probe_accuracy", label="probe accuracy %", higher_is_better=True, budget="ratio")
    speed_key = "sentences_per_s"
    speed_label = "sentences/s (1 thread, largest eval batch)"
    time_in_trials = False
    columns = (
        Column("probe_accuracy", "probe acc %", "{:.2f}"), Column("cosine_to_teacher", "cosine", "{:.4f}"),
        Column("neighbour_recall", "neighbour recall", "{:.3f}"), Column("seq_len", "seq len", "{}"),
        Column("params", "params", "{:d}"), Column("size_bytes", "size MB", "mb"),
        Column("sentences_per_s_b1", "sentences/s b1", "{:.1f}"), Column("sentences_per_s", "sentences/s", "{:.1f}"),
        Column("speedup", "speedup", "x"),
    )

    def __init__(self) -> None:
        self._split: tuple[Any, ...] | None = None
        self._teacher: nn.Module | None = None
        self._loaded: dict[str, nn.Module] = {}

    # data and teacher
    def check(self, cfg: Any) -> None:
        self._split = load_sentences(cfg.data)
        train, held, topics, split_by = self._split
        log(f"data: {len(train.texts)} train sentences, {len(held.texts)} held-out sentences (split {split_by}), labels {topics}")

    def _teacher_model(self, cfg: Any) -> nn.Module:
        if self._teacher is None:
            self._teacher = load_teacher(teacher_dir(cfg.model)).eval()
        return self._teacher

    def prepare(self, cfg: Any, run_dir: Path) -> dict[str, Any]:
        train, held, topics, split_by = self._split or load_sentences(cfg.data)
        tdir = teacher_dir(cfg.model)
        seq = cfg.model.max_seq_len
        tokenizer = load_tokenizer(tdir, max_seq_len=seq)
        kd, teacher_held = teacher_cache(cfg, self._teacher_model(cfg), tokenizer, train.texts, held.texts,
                                         run_dir / "cache" / "teacher.safetensors")
        probe_n = min(cfg.data.probe_train_sentences, len(train.texts))
        nval = min(300, len(held.texts))
        enc = tokenizer.encode_batch(held.texts[:nval])
        v_len = np.array([max(1, min(len(e.ids), seq)) for e in enc], dtype=np.int32)
        v_ids = np.zeros((nval, seq), dtype=np.int32)
        for i, e in enumerate(enc):
            v_ids[i, : v_len[i]] = e.ids[: v_len[i]]
        return {
            "teacher_dir": str(tdir), "base_config": teacher_config(tdir), "topics": topics, "split_by": split_by,
            "heldout_texts": held.texts, "heldout_labels": held.labels, "teacher_heldout": teacher_held,
            "probe_texts": train.texts[:probe_n], "probe_labels": train.labels[:probe_n],
            "kd": {"ids": kd.ids, "lengths": kd.lengths, "embeddings": kd.embeddings, "hidden": list(kd.hidden), "offsets": kd.offsets},
            "val": {"val_ids": v_ids, "val_lengths": v_len, "val_embeddings": teacher_held[:nval]},
        }

    def teacher(self, cfg: Any, data: dict[str, Any]) -> nn.Module:
        return self._teacher_model(cfg)

    def evaluate(self, cfg: Any, model: nn.Module, data: dict[str, Any], *, seq_len: int | None = None,
                 cache: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        seq = seq_len or cfg.model.max_seq_len
        tok = _tokenizer(data["teacher_dir"], cfg.model.max_seq_len)
        full = cache if cache is not None else {}
        with torch_threads(1 if cache is not None else os.cpu_count() or 1):
            held = _embed_at(model, tok, data["heldout_texts"], seq, full, "held")
            probe = _embed_at(model, tok, data["probe_texts"], seq, full, "probe")
        k = cfg.eval.neighbours_k
        q = quality(probe_train=probe, probe_train_labels=data["probe_labels"], heldout=held, heldout_labels=data["heldout_labels"],
                    teacher_heldout=data["teacher_heldout"], k=k, probe_c=cfg.eval.probe_c, seed=cfg.data.seed)
        q["neighbour_recall"] = q.pop(f"neighbour_recall_at_{k}")
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
        return {**q, "seq_len": seq, "params": count_params(model), "size_bytes": size}

    # students
    def plan_students(self, cfg: Any, teacher: nn.Module, *, data: Any = None) -> list[StudentPlan]:
        layers = cfg.model.student_layers
        spec = spec_for(truncated(teacher, layers), name="student", base_config=teacher_config(teacher_dir(cfg.model)),
                        max_seq_len=cfg.model.max_seq_len, metadata={"student_layers": layers})
        return [StudentPlan("student", spec.model_dump(), note=f"the teacher's layers {layers}, initialised from them")]

    def references(self, cfg: Any, teacher: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        return {"baseline": (truncated(teacher, cfg.model.student_layers), "the teacher truncated to the student's layers, untrained")}

    def init_state(self, cfg: Any, plan: StudentPlan, teacher: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in truncated(teacher, cfg.model.student_layers).state_dict().items()}

    def train_job(self, cfg: Any, plan: StudentPlan, *, distilled: bool) -> dict[str, Any]:
        d = cfg.distill
        return {"epochs": d.epochs, "lr": d.lr, "lr_schedule": d.lr_schedule, "weight_decay": d.weight_decay,
                "max_failures": d.max_failures,
                "task": {"warmup_steps": d.warmup_steps, "embed_loss": d.embed_loss, "hidden_weight": d.hidden_weight,
                         "freeze_word_embeddings": d.freeze_word_embeddings, "bucket_by_length": d.bucket_by_length,
                         "bf16_autocast": bf16_autocast(cfg)}}

    def train_data(self, cfg: Any, data: dict[str, Any], teacher: nn.Module | None) -> dict[str, Any]:
        return {**data["kd"], **data["val"]}

    # compression search
    def candidates(self, cfg: Any) -> dict[str, dict[str, Any]]:
        return {f"prune{r:.2f}": {"prune_ratio": r} for r in cfg.search.prune_ratios}

    def notes(self, cfg: Any) -> list[str]:
        _, why = searched_quantizations(cfg)
        return [f"bf16 left out of the search: {why}"] if why else []

    def measure_rows(self, cfg: Any, candidate: dict[str, Any], student: nn.Module, data: dict[str, Any], *,
                     out_dir: Path) -> list[dict[str, Any]]:
        """Prune + fine-tune at the candidate's ratio, then one row per (quantization, sequence length)."""
        s, d = cfg.search, cfg.distill
        ratio = candidate["prune_ratio"]
        # a fresh module from the student's weights (a transformers model unpickled in a trial loses its output hooks)
        model = build_float(spec_for(student, name="student", base_config=data["base_config"], max_seq_len=cfg.model.max_seq_len))
        model.load_state_dict(student.state_dict())
        tokenizer = _tokenizer(data["teacher_dir"], cfg.model.max_seq_len)
        params_before = count_params(model)
        if ratio > 0:
            ids, mask = tokenize(tokenizer, data["heldout_texts"][:4], max_seq_len=cfg.model.max_seq_len)
            model = prune_heads_ffn(model, ratio=ratio, example_inputs={"input_ids": ids, "attention_mask": mask})
            torch.manual_seed(d.seed)
            model = finetune_kd(model, KDData(**data["kd"]), epochs=s.finetune_epochs, batch_size=d.batch_size, lr=s.finetune_lr,
                                embed_loss=d.embed_loss, hidden_weight=d.hidden_weight, seed=d.seed,
                                freeze_word_embeddings=d.freeze_word_embeddings, bucket_by_length=d.bucket_by_length,
                                bf16_autocast=bf16_autocast(cfg))
        base = spec_for(model, name=out_dir.name, base_config=data["base_config"], max_seq_len=cfg.model.max_seq_len,
                        metadata={"prune_ratio": ratio, "student_layers": cfg.model.student_layers},
                        embedding_storage=s.embedding_storage)
        rows = []
        for quant in searched_quantizations(cfg)[0]:
            qdir = out_dir / quant
            q_model = model if quant in QUANTIZE_AT_LOAD else quantize_text(model, quant)
            save_text_artifact(qdir, q_model, base.model_copy(update={"quantization": quant, "name": f"{out_dir.name}-{quant}"}),
                               tokenizer_dir=data["teacher_dir"])
            saved, _ = load_text_artifact(qdir)  # score exactly what was saved
            full: dict[str, np.ndarray] = {}
            for seq_len in sorted(s.seq_lens, reverse=True):
                row = self.evaluate(cfg, saved, data, seq_len=seq_len, cache=full)
                rows.append({"variant": f"{quant}-seq{seq_len}", "settings": {"quantization": quant, "seq_len": seq_len,
                             "model_dir": str(qdir.resolve())},
                             **row, "params": count_params(model), "params_before_pruning": params_before,
                             "size_bytes": artifact_bytes(qdir), "heads_per_layer": base.heads_per_layer,
                             "ffn_per_layer": base.ffn_per_layer})
        return rows

    def build(self, candidate: dict[str, Any], student: nn.Module, data: dict[str, Any]) -> nn.Module:
        path = candidate["model_dir"]
        if path not in self._loaded:  # a quantization's sequence lengths share one model (and one compilation)
            self._loaded[path] = load_text_artifact(path)[0]
        return self._loaded[path]

    def budget(self, cfg: Any, *, teacher: dict[str, Any]) -> float:
        return 1.0 / cfg.search.min_probe_ratio

    def admissible_rule(self, cfg: Any) -> str | None:
        return f"cosine to the teacher at least {cfg.search.min_cosine:g} (search.min_cosine)"

    def admissible(self, cfg: Any, row: dict[str, Any], *, teacher: dict[str, Any]) -> bool:
        return row["cosine_to_teacher"] >= cfg.search.min_cosine - 1e-9

    def advice(self, error: str, candidate: dict[str, Any]) -> str:
        return f"leave {candidate['prune_ratio']} out of search.prune_ratios (or a quantization out of search.quantizations)"

    def time(self, models: dict[str, nn.Module], data: dict[str, Any], *, cfg: Any,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
        """Sentences/s of each model at every ``eval.batch_sizes`` (forward + mean pooling of pre-tokenised held-out
        sentences), one model at a time: ``sentences_per_s`` at the largest batch, ``sentences_per_s_b<N>`` at each."""
        s = cfg.search
        texts = data["heldout_texts"]
        out: dict[str, dict[str, float]] = {name: {} for name in models}
        big = max(cfg.eval.batch_sizes)
        for bs in cfg.eval.batch_sizes:
            n = s.timing_sentences if bs > 1 else max(16, s.timing_sentences // 4)
            batches = {}
            for name in models:
                seq = (settings or {}).get(name, {}).get("seq_len", cfg.model.max_seq_len)
                batches[name] = timing_batches(_tokenizer(data["teacher_dir"], seq), texts[:n], batch_size=bs, max_seq_len=seq)
            for name, model in models.items():
                sentences_per_s(model, batches[name][:2], num_threads=s.num_threads, repeats=1)  # warm-up
            for name, model in models.items():
                v = sentences_per_s(model, batches[name], num_threads=s.num_threads, repeats=1, warmup=0)["sentences_per_s"]
                out[name][f"sentences_per_s_b{bs}"] = v
                if bs == big:
                    out[name]["sentences_per_s"] = v
        return out

    # artifacts
    def save(self, path: Path, model: nn.Module, *, candidate: dict[str, Any], cfg: Any, data: dict[str, Any]) -> None:
        if "model_dir" in candidate:  # a searched candidate: its saved artifact, served at its sequence length
            copy_text_artifact(candidate["model_dir"], path, name=path.name, max_seq_len=candidate["seq_len"],
                               metadata={"prune_ratio": candidate.get("prune_ratio", 0.0), "seq_len": candidate["seq_len"],
                                         "student_layers": cfg.model.student_layers})
            return
        spec = spec_for(model, name=path.name, base_config=data["base_config"], max_seq_len=cfg.model.max_seq_len,
                        metadata={"student_layers": cfg.model.student_layers})
        save_text_artifact(path, model, spec, tokenizer_dir=data["teacher_dir"])

    def load(self, path: Path) -> nn.Module:
        return load_text_artifact(path)[0]

    def sample_request(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"texts": data["heldout_texts"][:4]}


@functools.lru_cache(maxsize=8)
def _tokenizer(directory: str, seq_len: int) -> Any:
    """One tokenizer per (folder, length), read from disk once per process (every evaluation and timing pass uses it)."""
    return load_tokenizer(directory, max_seq_len=seq_len)
