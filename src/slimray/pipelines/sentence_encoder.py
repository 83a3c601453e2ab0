"""The sentence-encoder family's stages on the one pipeline: MiniLM (or a local HF folder) teacher ->
layer-dropped student distilled on Ray Train -> head/FFN pruning x quantization x sequence length on Ray Tune
-> winner, timed side by side with the teacher.

``slimray.pipelines.run_pipeline(cfg, out_dir=...)`` writes ``OUT/<name>/``: ``teacher/``, ``baseline/`` (teacher truncated
to the student's layers, untrained), ``student/``, ``trials/``, ``winner/`` (text artifacts: safetensors +
JSON + tokenizer files), ``cache/teacher.safetensors`` (the teacher's outputs, computed once),
``distill_metrics.jsonl``, ``report.json``, ``report.md``, ``sample_request.json``. A rerun with the same name
reuses finished stages; a changed config is refused unless ``fresh``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_np, save_file as save_np

from slimray.storage import reusable, write_json_atomic
from slimray.schema import ConfigError
from slimray.pipelines import Stages
from slimray.runs import log
from slimray.sweep.select import choose, pareto_front
from slimray.families.sentence_encoder.compress import bf16_slow_reason, count_params, cpu_has_native_bf16, sentences_per_s, timing_batches
from slimray.families.sentence_encoder.config import TextPipelineConfig
from slimray.families.sentence_encoder.data import split_by_article, split_jsonl, topic_names
from slimray.families.sentence_encoder.evaluate import quality
from slimray.families.sentence_encoder.kd import KDData, target_layers, teacher_targets
from slimray.families.sentence_encoder.models import (
    TextArtifactSpec,
    artifact_bytes,
    copy_text_artifact,
    embed_texts,
    load_teacher,
    load_text_artifact,
    load_text_spec,
    load_tokenizer,
    save_text_artifact,
    spec_for,
    teacher_config,
    teacher_dir,
    truncated,
)


def _teacher_cache(cfg: TextPipelineConfig, teacher, tokenizer, train, held, run_dir: Path) -> tuple[KDData, np.ndarray]:
    """The teacher's outputs on the train sentences (embeddings + hidden states) and held-out embeddings, once."""
    path = run_dir / "cache" / "teacher.safetensors"
    layers = target_layers(cfg.model.student_layers) if cfg.distill.hidden_weight > 0 else []
    if path.exists():
        try:
            t = load_np(str(path))
            kd = KDData(ids=t["ids"], lengths=t["lengths"], embeddings=t["embeddings"], offsets=t["offsets"],
                        hidden=[t[f"hidden{i}"] for i in range(len(layers))])
            log("teacher: reusing cached outputs")
            return kd, t["heldout_embeddings"]
        except (SafetensorError, KeyError, OSError) as err:  # truncated or damaged: recompute it alone
            log(f"teacher: {path} is damaged ({type(err).__name__}): recomputing it")
    log(f"teacher: embedding {len(train.texts)} train sentences once (+ hidden states of layers {layers}) and {len(held.texts)} held-out")
    with torch_threads(os.cpu_count() or 1):
        kd = teacher_targets(teacher, tokenizer, train.texts, max_seq_len=cfg.model.max_seq_len, hidden_layers=layers)
        held_emb = embed_texts(teacher, tokenizer, held.texts, max_seq_len=cfg.model.max_seq_len)
    arrays = {"ids": kd.ids, "lengths": kd.lengths, "embeddings": kd.embeddings, "offsets": kd.offsets, "heldout_embeddings": held_emb}
    arrays.update({f"hidden{i}": h for i, h in enumerate(kd.hidden)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_np(arrays, str(tmp))
    os.replace(tmp, path)
    return kd, held_emb


class torch_threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _save_if_missing(path: Path, model, spec, *, tokenizer_dir: Path) -> None:
    if not reusable(path, spec_cls=TextArtifactSpec, log=log):  # missing, or damaged (rebuilt with one line)
        save_text_artifact(path, model, spec, tokenizer_dir=tokenizer_dir)


def _time_models(models: dict[str, tuple[Any, int]], texts: list[str], tokenizer_dir, *, batch_sizes: list[int], sentences_b32: int,
                 num_threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Sentences/s per model and batch size; models are timed round-robin (one at a time, same conditions)."""
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for bs in batch_sizes:
        n = sentences_b32 if bs > 1 else max(16, sentences_b32 // 4)
        samples: dict[str, list[float]] = {name: [] for name in models}
        batches = {}
        for name, (_, seq_len) in models.items():
            tok = load_tokenizer(tokenizer_dir, max_seq_len=seq_len)
            batches[name] = timing_batches(tok, texts[:n], batch_size=bs, max_seq_len=seq_len)
        for name, (model, _) in models.items():  # warm-up
            sentences_per_s(model, batches[name][:2], num_threads=num_threads, repeats=1)
        for _ in range(repeats):
            for name, (model, _) in models.items():
                samples[name].append(sentences_per_s(model, batches[name], num_threads=num_threads, repeats=1, warmup=0)["sentences_per_s"])
        for name in models:
            out[name][f"batch_{bs}"] = float(np.median(samples[name]))
    return out


def _quality_of(model, tokenizer_dir, seq_len: int, *, held, probe_texts, probe_labels, teacher_held, cfg) -> dict[str, float]:
    tok = load_tokenizer(tokenizer_dir, max_seq_len=seq_len)
    with torch_threads(os.cpu_count() or 1):
        h = embed_texts(model, tok, held.texts, max_seq_len=seq_len)
        p = embed_texts(model, tok, probe_texts, max_seq_len=seq_len)
    return quality(probe_train=p, probe_train_labels=probe_labels, heldout=h, heldout_labels=held.labels,
                   teacher_heldout=teacher_held, k=cfg.eval.neighbours_k, probe_c=cfg.eval.probe_c, seed=cfg.data.seed)


def load_sentences(data) -> tuple[Any, Any, list[str], str]:
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


@dataclass
class Sentences:
    """What ``check`` read: the split sentences and the probe's training slice."""

    train: Any
    held: Any
    topics: list[str]
    split_by: str
    probe_texts: list[str]
    probe_labels: Any


@dataclass
class Distilled:
    """What ``distil`` leaves for ``search``: the teacher, its cached outputs, the baseline and the student's folder."""

    teacher: Any
    tokenizer: Any
    teacher_dir: Path
    kd: KDData
    teacher_held: np.ndarray
    teacher_probe: np.ndarray
    baseline: Any
    layers: list[int]
    seq: int
    student_dir: Path
    amp: bool
    t_distilled: float


class EncoderStages(Stages):
    """The sentence-encoder family on the one pipeline (``slimray.pipelines.run_pipeline``): ``check`` reads and
    splits the sentences (before Ray starts), ``distil`` caches the teacher's outputs, saves the teacher and the
    truncated baseline and distils the student on Ray Train (the family's TrainTask), ``search`` prunes heads/FFN
    on Ray Tune, scores every quantization x sequence length, times the finalists side by side, picks the winner
    and writes the report. ``check`` leaves ``self.sentences``, ``distil`` leaves ``self.distilled``."""

    names = ("distil", "search")

    def check(self) -> None:
        train, held, topics, split_by = load_sentences(self.cfg.data)
        probe_n = min(self.cfg.data.probe_train_sentences, len(train.texts))
        log(f"data: {len(train.texts)} train sentences, {len(held.texts)} held-out sentences (split {split_by}), labels {topics}")
        self.sentences = Sentences(train=train, held=held, topics=topics, split_by=split_by,
                                   probe_texts=train.texts[:probe_n], probe_labels=train.labels[:probe_n])

    def open(self, run_dir: Path, t_start: float) -> None:
        self.run_dir, self.t_start = run_dir, t_start

    def distil(self) -> None:
        from slimray.training.distill import TrainJob, run_training

        cfg, run_dir = self.cfg, self.run_dir
        held, train = self.sentences.held, self.sentences.train
        probe_n = len(self.sentences.probe_texts)
        tdir = teacher_dir(cfg.model)
        teacher = load_teacher(tdir)
        log(f"teacher: {tdir if cfg.model.source == 'huggingface' else cfg.model.teacher} ({teacher.config.num_hidden_layers} layers)")
        seq = cfg.model.max_seq_len
        tokenizer = load_tokenizer(tdir, max_seq_len=seq)
        base_cfg = teacher_config(tdir)
        kd, teacher_held = _teacher_cache(cfg, teacher, tokenizer, train, held, run_dir)
        teacher_probe = kd.embeddings[:probe_n]
        _save_if_missing(run_dir / "teacher", teacher, spec_for(teacher, name="teacher", base_config=base_cfg, max_seq_len=seq), tokenizer_dir=tdir)
        layers = cfg.model.student_layers
        meta = {"student_layers": layers}
        baseline = truncated(teacher, layers)
        _save_if_missing(run_dir / "baseline", baseline, spec_for(baseline, name="baseline", base_config=base_cfg, max_seq_len=seq, metadata=meta),
                         tokenizer_dir=tdir)

        # distillation on Ray Train
        student_dir = run_dir / "student"
        amp = cfg.distill.mixed_precision == "bf16" or (cfg.distill.mixed_precision == "auto" and cpu_has_native_bf16())
        if reusable(student_dir, spec_cls=TextArtifactSpec, log=log):
            log("student: reusing the distilled student")
        else:
            d = cfg.distill
            log(f"student: teacher layers {layers}, {d.epochs} epochs of embedding ({d.embed_loss}) + hidden-state KD "
                f"(weight {d.hidden_weight}), {d.num_workers} Ray Train workers (gloo, 1 thread each), batch {d.batch_size}, "
                f"{'bf16 autocast' if amp else 'fp32'}")
            spec = spec_for(baseline, name="student", base_config=base_cfg, max_seq_len=seq, metadata=meta)
            nval = min(300, len(held.texts))
            enc = tokenizer.encode_batch(held.texts[:nval])
            v_len = np.array([max(1, min(len(e.ids), seq)) for e in enc], dtype=np.int32)
            v_ids = np.zeros((nval, seq), dtype=np.int32)
            for i, e in enumerate(enc):
                v_ids[i, : v_len[i]] = e.ids[: v_len[i]]
            job = TrainJob(
                label="distill", family="sentence_encoder", run_name=f"{cfg.name}-distill", storage_path=str(run_dir / "ray"),
                spec=spec.model_dump(), epochs=d.epochs, batch_size=d.batch_size, lr=d.lr, lr_schedule=d.lr_schedule,
                weight_decay=d.weight_decay, num_workers=d.num_workers, max_failures=d.max_failures, seed=d.seed,
                metrics_path=str(run_dir / "distill_metrics.jsonl"),
                task={"warmup_steps": d.warmup_steps, "embed_loss": d.embed_loss, "hidden_weight": d.hidden_weight,
                      "freeze_word_embeddings": d.freeze_word_embeddings, "bucket_by_length": d.bucket_by_length, "bf16_autocast": amp},
            )
            shared = {"ids": kd.ids, "lengths": kd.lengths, "embeddings": kd.embeddings, "hidden": list(kd.hidden), "offsets": kd.offsets,
                      "val_ids": v_ids, "val_lengths": v_len, "val_embeddings": teacher_held[:nval]}
            student, metrics = run_training(job, shared, init_state={k_: v.clone() for k_, v in baseline.state_dict().items()})
            save_text_artifact(student_dir, student, spec, tokenizer_dir=tdir)
        t_distilled = time.perf_counter()

        self.distilled = Distilled(teacher=teacher, tokenizer=tokenizer, teacher_dir=tdir, kd=kd, teacher_held=teacher_held,
                                   teacher_probe=teacher_probe, baseline=baseline, layers=layers, seq=seq, student_dir=student_dir,
                                   amp=amp, t_distilled=t_distilled)

    def search(self) -> dict[str, Any]:
        from slimray.sweep.encoder_search import run_search

        cfg, run_dir, t_start = self.cfg, self.run_dir, self.t_start
        sen, dst = self.sentences, self.distilled
        held, train, topics, split_by = sen.held, sen.train, sen.topics, sen.split_by
        probe_texts, probe_labels, probe_n = sen.probe_texts, sen.probe_labels, len(sen.probe_texts)
        k = cfg.eval.neighbours_k
        recall_key = f"neighbour_recall_at_{k}"
        amp, baseline, kd, layers, seq, student_dir, tdir = dst.amp, dst.baseline, dst.kd, dst.layers, dst.seq, dst.student_dir, dst.teacher_dir
        teacher, teacher_held, teacher_probe, t_distilled = dst.teacher, dst.teacher_held, dst.teacher_probe, dst.t_distilled
        # compression search
        s = cfg.search
        left_out = []
        if "bf16" in s.quantizations and len(s.quantizations) > 1 and (why := bf16_slow_reason()):
            left_out.append({"quantization": "bf16", "why": why})
            s = s.model_copy(update={"quantizations": [q for q in s.quantizations if q != "bf16"]})
            log(f"search: bf16 left out: {why}")
        log(f"search: prune ratios {s.prune_ratios} x quantizations {s.quantizations} x seq lens {s.seq_lens} "
            f"({'Ray Tune' if s.use_tune else 'in the driver'})")
        ctx = {
            "run_dir": str(run_dir), "student_dir": str(student_dir), "search": s.model_dump(), "seed": cfg.distill.seed,
            "batch_size": cfg.distill.batch_size, "embed_loss": cfg.distill.embed_loss, "hidden_weight": cfg.distill.hidden_weight,
            "freeze_word_embeddings": cfg.distill.freeze_word_embeddings, "bucket_by_length": cfg.distill.bucket_by_length,
            "bf16_autocast": amp,
            "k": k, "probe_c": cfg.eval.probe_c,
        }
        evalset = {"heldout_texts": held.texts, "heldout_labels": held.labels, "probe_texts": probe_texts, "probe_labels": probe_labels,
                   "teacher_heldout": teacher_held}
        rows = run_search(ctx=ctx, kd_data=kd, evalset=evalset, use_tune=s.use_tune)
        t_searched = time.perf_counter()

        # quality of the references
        log("eval: teacher, untrained truncated baseline and distilled student on the held-out sentences")
        teacher_q = quality(probe_train=teacher_probe, probe_train_labels=probe_labels, heldout=teacher_held, heldout_labels=held.labels,
                            teacher_heldout=teacher_held, k=k, probe_c=cfg.eval.probe_c, seed=cfg.data.seed)
        student, _ = load_text_artifact(student_dir)
        common = dict(held=held, probe_texts=probe_texts, probe_labels=probe_labels, teacher_held=teacher_held, cfg=cfg)
        baseline_q = _quality_of(baseline, tdir, seq, **common)
        student_q = _quality_of(student, tdir, seq, **common)

        # selection: quality constraints, then speed measured one model at a time
        ok = [r for r in rows if r["status"] == "ok"]
        probe_floor = s.min_probe_ratio * teacher_q["probe_accuracy"]
        for r in ok:
            r["accuracy"] = r["probe_accuracy"]
            r["meets_cosine"] = r["cosine_to_teacher"] >= s.min_cosine - 1e-9
            r["meets_probe"] = r["probe_accuracy"] >= probe_floor - 1e-9
        texts = held.texts
        log(f"timing: {len(ok)} candidates at batch 32, {s.num_threads} thread(s), one at a time")
        by_dir: dict[str, Any] = {}  # one model per artifact: its seq-len variants share it (and one compilation)
        for r in ok:
            if r["model_dir"] not in by_dir:
                by_dir[r["model_dir"]] = load_text_artifact(r["model_dir"])[0]
        loaded = {r["key"]: by_dir[r["model_dir"]] for r in ok}
        quick = _time_models({r["key"]: (loaded[r["key"]], r["seq_len"]) for r in ok}, texts, tdir, batch_sizes=[32],
                             sentences_b32=s.timing_sentences, num_threads=s.num_threads, repeats=max(2, s.timing_repeats // 2))
        for r in ok:
            r["sentences_per_s_quick"] = quick[r["key"]]["batch_32"]
            r["ms_per_sentence_b32"] = 1000.0 / r["sentences_per_s_quick"]
        quality_ok = [r for r in ok if r["meets_cosine"]]
        finalists = sorted(quality_ok, key=lambda r: r["ms_per_sentence_b32"])[: s.num_finalists]
        if not finalists:
            finalists = sorted(ok, key=lambda r: -r["cosine_to_teacher"])[: s.num_finalists]
        log(f"timing: teacher, baseline, student and finalists {[r['key'] for r in finalists]} side by side (batch {cfg.eval.batch_sizes})")
        timed = {"teacher": (teacher, seq), "baseline": (baseline, seq), "student": (student, seq)}
        timed.update({r["key"]: (loaded[r["key"]], r["seq_len"]) for r in finalists})
        speeds = _time_models(timed, texts, tdir, batch_sizes=cfg.eval.batch_sizes, sentences_b32=s.timing_sentences,
                              num_threads=s.num_threads, repeats=s.timing_repeats)
        big = f"batch_{max(cfg.eval.batch_sizes)}"
        for r in finalists:
            r["sentences_per_s"] = speeds[r["key"]]
            r["ms_per_sentence_b32"] = 1000.0 / speeds[r["key"]][big]
        winner, feasible, _ = choose(
            [r for r in finalists if r["meets_cosine"]] or finalists, quality_key="probe_accuracy", higher_is_better=True,
            floor=probe_floor, speed_key="ms_per_sentence_b32", faster="min",
        )
        feasible = feasible and bool(winner and winner["meets_cosine"])
        if winner is None:
            raise RuntimeError("no compression trial finished; see trials/*.error.json")
        win_spec = load_text_spec(winner["model_dir"])
        copy_text_artifact(winner["model_dir"], run_dir / "winner", name="winner", max_seq_len=winner["seq_len"],
                           metadata={**win_spec.metadata, "key": winner["key"], "seq_len": winner["seq_len"]})

        def entry(q: dict[str, float], size: int, params: int, sps: dict[str, float], **extra) -> dict[str, Any]:
            return {"probe_accuracy": q["probe_accuracy"], "cosine_to_teacher": q["cosine_to_teacher"], recall_key: q[recall_key],
                    "size_bytes": size, "params": params, "sentences_per_s": sps, **extra}

        t_size = artifact_bytes(run_dir / "teacher")
        w_size = artifact_bytes(run_dir / "winner")
        report: dict[str, Any] = {
            "name": cfg.name, "family": "sentence_encoder", "recipe": cfg.recipe,
            "data": {"train_sentences": len(train.texts), "heldout_sentences": len(held.texts), "probe_train_sentences": probe_n,
                     "topics": topics, "split": split_by},
            "timing": {"num_threads": s.num_threads, "batch_sizes": cfg.eval.batch_sizes, "sentences": s.timing_sentences,
                       "repeats": s.timing_repeats, "what": "forward + mean pooling on pre-tokenised held-out sentences (padding to the batch's longest)"},
            "teacher": entry(teacher_q, t_size, count_params(teacher), speeds["teacher"], layers=6, seq_len=seq),
            "baseline": entry(baseline_q, artifact_bytes(run_dir / "baseline"), count_params(baseline), speeds["baseline"],
                              layers=len(layers), seq_len=seq, what="teacher truncated to the student's layers, untrained"),
            "student": entry(student_q, artifact_bytes(student_dir), count_params(student), speeds["student"], layers=len(layers),
                             teacher_layers=layers, seq_len=seq),
            "winner": entry(winner, w_size, winner["params"], winner["sentences_per_s"], key=winner["key"], prune_ratio=winner["prune_ratio"],
                            quantization=winner["quantization"], seq_len=winner["seq_len"], heads_per_layer=winner["heads_per_layer"],
                            ffn_per_layer=winner["ffn_per_layer"]),
            "winner_feasible": feasible,
            "trials": rows,
            "pareto_front": [r["key"] for r in pareto_front(ok, latency_key="ms_per_sentence_b32")],
            "finalists": [r["key"] for r in finalists],
            "search_left_out": left_out,
        }
        tw, ww = report["teacher"], report["winner"]
        report["targets"] = _targets(tw, ww, s, big)
        report["distill_metrics"] = _read_jsonl(run_dir / "distill_metrics.jsonl")
        d = cfg.distill
        report["distill"] = {"epochs": d.epochs, "batch_size": d.batch_size, "lr": d.lr, "num_workers": d.num_workers,
                             "embed_loss": d.embed_loss, "hidden_weight": d.hidden_weight, "bf16_autocast": amp,
                             "freeze_word_embeddings": d.freeze_word_embeddings, "bucket_by_length": d.bucket_by_length}
        report["wall_s"] = {"distill_and_before": t_distilled - t_start, "search": t_searched - t_distilled,
                            "total": time.perf_counter() - t_start}
        write_json_atomic(run_dir / "report.json", report)
        write_json_atomic(run_dir / "sample_request.json", {"texts": held.texts[:4]})
        (run_dir / ".report.md.tmp").write_text(render_markdown(report))
        os.replace(run_dir / ".report.md.tmp", run_dir / "report.md")
        log(f"done in {report['wall_s']['total']:.0f}s: winner {winner['key']} (cosine {ww['cosine_to_teacher']:.4f}, "
            f"probe {ww['probe_accuracy']:.2f}% vs teacher {tw['probe_accuracy']:.2f}%, "
            f"{ww['sentences_per_s'][big] / tw['sentences_per_s'][big]:.2f}x sentences/s at {big}, "
            f"{tw['size_bytes'] / ww['size_bytes']:.2f}x smaller) -> {run_dir / 'winner'}")
        return report


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _targets(t: dict[str, Any], w: dict[str, Any], s, big: str) -> dict[str, dict[str, Any]]:
    speed = w["sentences_per_s"][big] / t["sentences_per_s"][big]
    probe = w["probe_accuracy"] / t["probe_accuracy"]
    size = t["size_bytes"] / w["size_bytes"]
    rows = {
        "cosine_to_teacher": (w["cosine_to_teacher"], s.min_cosine),
        "probe_ratio": (probe, s.min_probe_ratio),
        f"speedup_{big}": (speed, 4.0),
        "size_ratio": (size, 2.0),
    }
    return {k: {"value": v, "target": tgt, "met": v >= tgt - 1e-9, "missed_by": max(0.0, tgt - v)} for k, (v, tgt) in rows.items()}


def render_markdown(r: dict[str, Any]) -> str:
    big = f"batch_{max(r['timing']['batch_sizes'])}"
    recall = next(k for k in r["teacher"] if k.startswith("neighbour_recall_at_"))
    lines = [
        f"# {r['name']}: sentence-embedding compression report", "",
        f"{r['data']['train_sentences']} train / {r['data']['heldout_sentences']} held-out BBC News sentences (split by article); "
        f"probe fitted on {r['data']['probe_train_sentences']} train-article sentences. Timing: {r['timing']['num_threads']} torch "
        f"thread(s), {r['timing']['what']}.", "",
        f"| model | probe acc % | cosine to teacher | {recall.replace('_', ' ')} | size MB | sentences/s b1 | sentences/s {big.replace('_', ' ')} | vs teacher ({big}) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tsp = r["teacher"]["sentences_per_s"][big]
    for name in ("teacher", "baseline", "student", "winner"):
        e = r[name]
        label = name if name != "winner" else f"winner ({e['key']})"
        lines.append(
            f"| {label} | {e['probe_accuracy']:.2f} | {e['cosine_to_teacher']:.4f} | {e[recall]:.3f} | {e['size_bytes'] / 1e6:.1f} | "
            f"{e['sentences_per_s'].get('batch_1', float('nan')):.1f} | {e['sentences_per_s'][big]:.1f} | {e['sentences_per_s'][big] / tsp:.2f}x |"
        )
    lines += ["", "## Targets", "", "| target | value | required | met | missed by |", "| --- | --- | --- | --- | --- |"]
    for k, t in r["targets"].items():
        lines.append(f"| {k} | {t['value']:.4f} | {t['target']:.4g} | {'yes' if t['met'] else 'no'} | {t['missed_by']:.4f} |")
    lines += ["", "## All candidates", "", "| key | cosine | probe % | recall | size MB | sentences/s b32 (quick pass) |", "| --- | --- | --- | --- | --- | --- |"]
    for t in r["trials"]:
        if t["status"] != "ok":
            lines.append(f"| {t['key']} | error: {t.get('error', '')[:80]} | | | | |")
            continue
        lines.append(f"| {t['key']} | {t['cosine_to_teacher']:.4f} | {t['probe_accuracy']:.2f} | {t[recall]:.3f} | "
                     f"{t['size_bytes'] / 1e6:.1f} | {t.get('sentences_per_s_quick', float('nan')):.1f} |")
    if r.get("distill"):
        d, m = r["distill"], r.get("distill_metrics") or [{}]
        lines += ["", "## Distillation", "",
                  f"{d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']}, {d['num_workers']} Ray Train workers, loss "
                  f"{d['embed_loss']} + {d['hidden_weight']} x hidden-state MSE, {'bf16 autocast' if d['bf16_autocast'] else 'fp32'}, "
                  f"word embeddings {'frozen' if d['freeze_word_embeddings'] else 'trained'}; val cosine per epoch: "
                  + ", ".join(f"{e.get('val_cosine', float('nan')):.4f}" for e in m)
                  + (f"; {m[-1].get('sentences_per_s', float('nan')):.0f} sentences/s in the last epoch." if m[-1] else ".")]
    for lo in r.get("search_left_out", []):
        lines += ["", f"Left out of the search: {lo['quantization']} ({lo['why']})."]
    lines += ["", f"Wall time: {r['wall_s']['total']:.0f} s (distillation and before {r['wall_s']['distill_and_before']:.0f} s, "
              f"search {r['wall_s']['search']:.0f} s)."]
    return "\n".join(lines) + "\n"
