"""The compression search for sentence encoders: one Ray Tune trial per head/FFN prune ratio, on the shared
Tune engine (``slimray.sweep.engine``).

A trial loads the distilled student, prunes ``ratio`` of every layer's heads and FFN neurons
(torch-pruning), fine-tunes it with KD from the cached teacher outputs, saves the pruned float model, then
for every quantization (none, dynamic int8, bf16) and every inference sequence length measures quality
on the held-out sentences (cosine to the teacher, neighbour recall, probe accuracy) and bytes on disk.
Trials do not time anything: on a 2-core machine concurrent timings disturb each other, so the driver
times every candidate afterwards, one at a time (``slimray.pipelines.sentence_encoder``). The shared trainable
(``slimray.sweep.trials``) runs the ratios: a trial whose result file already exists is not rerun.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimray.families.sentence_encoder.compress import count_params, prune_heads_ffn
from slimray.families.sentence_encoder.evaluate import quality
from slimray.families.sentence_encoder.kd import KDData, finetune_kd
from slimray.families.sentence_encoder.models import (
    QUANTIZE_AT_LOAD,
    artifact_bytes,
    embed_texts,
    load_text_artifact,
    load_tokenizer,
    quantize_text,
    save_text_artifact,
    spec_for,
    tokenize,
)


def ratio_key(ratio: float) -> str:
    return f"prune{ratio:.2f}"


def candidate_key(ratio: float, quant: str, seq_len: int) -> str:
    return f"{ratio_key(ratio)}-{quant}-seq{seq_len}"


def run_ratio(ratio: float, ctx: dict[str, Any], *, kd_data: KDData, evalset: dict[str, Any]) -> list[dict[str, Any]]:
    """Prune + fine-tune at ``ratio``, then every (quantization, seq len): quality and size. Pure torch."""
    run_dir = Path(ctx["run_dir"])
    search = ctx["search"]
    student, spec = load_text_artifact(ctx["student_dir"])
    tok_dir = ctx["student_dir"]
    tokenizer = load_tokenizer(tok_dir, max_seq_len=spec.max_seq_len)
    params_before = count_params(student)
    if ratio > 0:
        ids, mask = tokenize(tokenizer, evalset["heldout_texts"][:4], max_seq_len=spec.max_seq_len)
        student = prune_heads_ffn(student, ratio=ratio, example_inputs={"input_ids": ids, "attention_mask": mask})
        torch.manual_seed(ctx["seed"])
        student = finetune_kd(
            student, kd_data, epochs=search["finetune_epochs"], batch_size=ctx["batch_size"], lr=search["finetune_lr"],
            embed_loss=ctx["embed_loss"], hidden_weight=ctx["hidden_weight"], seed=ctx["seed"],
            freeze_word_embeddings=ctx["freeze_word_embeddings"], bucket_by_length=ctx["bucket_by_length"],
            bf16_autocast=ctx["bf16_autocast"],
        )
    base = spec_for(student, name=ratio_key(ratio), base_config=spec.bert_config, max_seq_len=spec.max_seq_len,
                    metadata={"prune_ratio": ratio, "student_layers": spec.metadata.get("student_layers")},
                    embedding_storage=search["embedding_storage"])
    rows = []
    for quant in search["quantizations"]:
        qdir = run_dir / "trials" / f"{ratio_key(ratio)}-{quant}"
        model = student if quant in QUANTIZE_AT_LOAD else quantize_text(student, quant)
        save_text_artifact(qdir, model, base.model_copy(update={"quantization": quant, "name": qdir.name}), tokenizer_dir=tok_dir)
        model, _ = load_text_artifact(qdir)  # score exactly what was saved
        full: dict[str, np.ndarray] = {}
        for seq_len in sorted(search["seq_lens"], reverse=True):
            held = _embed_at(model, tokenizer, evalset["heldout_texts"], seq_len, full, "held")
            probe = _embed_at(model, tokenizer, evalset["probe_texts"], seq_len, full, "probe")
            q = quality(
                probe_train=probe, probe_train_labels=evalset["probe_labels"], heldout=held, heldout_labels=evalset["heldout_labels"],
                teacher_heldout=evalset["teacher_heldout"], k=ctx["k"], probe_c=ctx["probe_c"], seed=ctx["seed"],
            )
            rows.append({
                "key": candidate_key(ratio, quant, seq_len), "status": "ok", "prune_ratio": ratio, "quantization": quant,
                "seq_len": seq_len, "model_dir": str(qdir), "size_bytes": artifact_bytes(qdir),
                "params": count_params(student), "params_before_pruning": params_before,
                "heads_per_layer": base.heads_per_layer, "ffn_per_layer": base.ffn_per_layer, **q,
            })
    return rows


def _embed_at(model, tokenizer, texts: list[str], seq_len: int, full: dict[str, np.ndarray], tag: str) -> np.ndarray:
    """Embeddings at ``seq_len``: texts no longer than ``seq_len`` tokens reuse the longest setting's embeddings
    (the same tokens, so the same embedding up to float rounding); only truncated texts are recomputed."""
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(list(texts))])  # tokenizer truncates at its own max
    if tag not in full:
        full[tag] = embed_texts(model, tokenizer, texts, max_seq_len=seq_len)
        return full[tag]
    out = full[tag].copy()
    redo = np.flatnonzero(lengths > seq_len)
    if len(redo):
        out[redo] = embed_texts(model, tokenizer, [texts[i] for i in redo], max_seq_len=seq_len)
    return out


def _measure(key: str, shared: dict[str, Any], *, ratios: dict[str, float], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """One prune ratio as a trial of the shared trainable (``slimray.sweep.trials``)."""
    return run_ratio(ratios[key], ctx, kd_data=KDData(**shared["kd"]), evalset=shared["eval"])


def run_search(*, ctx: dict[str, Any], kd_data: KDData, evalset: dict[str, Any], use_tune: bool,
               max_concurrent_trials: int = 2) -> list[dict[str, Any]]:
    """All candidates (one row per ratio x quantization x seq len); failed ratios give a row with status 'error'.
    With ``use_tune`` each ratio is a trial of the shared trainable (an interrupted search resumes, finished trials
    are kept); without, the ratios run in the driver."""
    from slimray.sweep.trials import run_trials

    ratios = {ratio_key(r): r for r in ctx["search"]["prune_ratios"]}
    kd = {"ids": kd_data.ids, "lengths": kd_data.lengths, "embeddings": kd_data.embeddings, "hidden": list(kd_data.hidden),
          "offsets": kd_data.offsets}
    results = run_trials(
        run_dir=ctx["run_dir"], keys=list(ratios), measure=functools.partial(_measure, ratios=ratios, ctx=ctx),
        shared={"kd": kd, "eval": evalset}, run_name="text-search", max_concurrent_trials=max_concurrent_trials,
        use_tune=use_tune,
    )
    rows: list[dict[str, Any]] = []
    for key, result in results.items():
        if isinstance(result, dict) and result.get("status") == "error":
            rows.append({"key": key, "prune_ratio": ratios[key], **result})
        else:
            rows += result
    return rows


def embeddings_at(model, tokenizer, texts, *, seq_len: int) -> np.ndarray:
    return embed_texts(model, tokenizer, texts, max_seq_len=seq_len)
