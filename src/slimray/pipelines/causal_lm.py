"""The causal_lm family's stages on the one pipeline (issue #17): SmolLM2 (or a local HF folder) teacher ->
depth-pruned students (layers kept by measured importance) distilled on Ray Train (from the teacher's cached top-k
logits or with the teacher in the loop, optionally with a hidden-state loss) -> {teacher, students} x
quantization x runtime on Ray Tune -> winner (fastest batch-1 decode within the perplexity budget), re-timed side
by side with the teacher, stored as a standard HF folder (compressed-tensors for int8 / int4) that vLLM loads.

``run_pipeline(cfg, out_dir=...)`` writes ``OUT/<name>/``: ``teacher/`` (the GGUF converted once; a user's folder
is read in place), ``students/<name>/`` (distilled, float), ``trials/<key>.json``, ``winner/`` (``save_lm``:
float / bf16 safetensors, or compressed-tensors W8A8 / W4A16, which vLLM and plain ``transformers`` load),
``export/`` (only for a sparse winner: the plain float folder), ``teacher_eval.json``, ``importance.json``, ``cache/`` (the
teacher's argmax predictions, and its top-k logits unless the teacher distils in the loop),
``distill_metrics_<student>.jsonl``, ``report.json``, ``report.md``, ``report.png``. A rerun with the same name reuses finished pieces.

State passes between stages as the attributes set in ``open`` (all ``None`` until their stage runs).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimray.storage import write_json_atomic
from slimray.compress.cpu import without_slow_bf16
from slimray.compress.measure import torch_threads
from slimray.families.causal_lm.config import LMPipelineConfig
from slimray.pipelines import Stages
from slimray.runs import log

TEACHER = "teacher"
AS_GIVEN = "teacher-none-hf_eager"  # the teacher as given: fp32, HF generate (the key its trial has too)


@dataclass
class StudentPlan:
    """One derived student: its name, the original layers kept, the pruning reports and its folder."""

    name: str
    num_layers: int
    kept: list[int]
    folder: Path
    width: dict[str, Any] | None = None
    model: torch.nn.Module | None = None  # the pruned, untrained student (None once distilled)


class CausalLMStages(Stages):
    names = ("prepare", "evaluate_teacher", "derive_students", "distil", "search", "report")

    def __init__(self, cfg: LMPipelineConfig):
        super().__init__(cfg)
        self.cfg: LMPipelineConfig = cfg
        self.run_dir: Path | None = None
        self.t_start: float = 0.0
        self.stage_s: dict[str, float] = {}
        self.teacher_dir: Path | None = None
        self.teacher: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.data_info: dict[str, Any] = {}
        self.eval_windows: torch.Tensor | None = None
        self.val_windows: torch.Tensor | None = None
        self.train_windows: torch.Tensor | None = None
        self.teacher_argmax: torch.Tensor | None = None
        self.teacher_eval: dict[str, Any] | None = None
        self.importance: list[float] | None = None
        self.students: list[StudentPlan] = []
        self.distill_reports: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def check(self) -> None:
        if self.cfg.teacher.source == "smollm2":
            from slimray.families.causal_lm.teacher import smollm2_gguf_path

            smollm2_gguf_path()  # the wheel is installed (else a ConfigError naming the pip command)
        if self.cfg.data.source == "wiki":
            from slimray.families.causal_lm.data import wiki_summaries_path

            wiki_summaries_path()

    def open(self, run_dir: Path, t_start: float) -> None:
        from transformers.utils import logging as hf_logging

        self.run_dir, self.t_start = run_dir, t_start
        self._mark = time.perf_counter()
        if not _verbose():
            hf_logging.disable_progress_bar()  # conversion / loading / saving bars: the console gets stage lines

    def _done(self, stage: str) -> None:
        now = time.perf_counter()
        self.stage_s[stage] = now - self._mark
        self._mark = now

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The teacher folder (GGUF converted once) and the data windows, split by article."""
        from slimray.families.causal_lm.data import load_jsonl_texts, load_wiki_summaries, pack_windows, split_documents
        from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm

        cfg, run_dir = self.cfg, self.run_dir
        if cfg.teacher.source == "smollm2":
            fresh = not (run_dir / "teacher" / "config.json").is_file()
            t0 = time.perf_counter()
            self.teacher_dir = ensure_smollm2_teacher(run_dir / "teacher")
            log(f"teacher: SmolLM2-135M-Instruct GGUF {'converted to fp32 safetensors' if fresh else 'reused'} in "
                f"{time.perf_counter() - t0:.0f}s -> {self.teacher_dir} (its weights were 4-bit: int4 would look nearly free)")
        else:
            self.teacher_dir = Path(cfg.teacher.path)
            log(f"teacher: {self.teacher_dir}")
        self.teacher, self.tokenizer = load_causal_lm(self.teacher_dir)
        d = cfg.data
        docs = load_wiki_summaries() if d.source == "wiki" else load_jsonl_texts(d.path, text_field=d.text_field, group_field=d.group_field)
        split = split_documents(docs, seed=d.seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction)
        self.eval_windows = pack_windows(split["test"], self.tokenizer, window_len=d.window_len, num_windows=d.num_eval_windows)
        num_val = max(cfg.student.num_importance_windows, cfg.distill.num_val_windows)
        self.val_windows = pack_windows(split["val"], self.tokenizer, window_len=cfg.distill.seq_len, num_windows=num_val)
        if cfg.student.depths:
            self.train_windows = pack_windows(split["train"], self.tokenizer, window_len=cfg.distill.seq_len,
                                              num_windows=cfg.distill.num_train_windows())
        self.data_info = {
            "source": d.source, "documents": {k: len(v) for k, v in split.items()}, "split": f"by article, seed {d.seed}",
            "eval_windows": len(self.eval_windows), "window_len": d.window_len,
            "val_windows": len(self.val_windows), "train_windows": 0 if self.train_windows is None else len(self.train_windows),
            "train_window_len": cfg.distill.seq_len,
        }
        log(f"data: {', '.join(f'{v} {k}' for k, v in self.data_info['documents'].items())} documents (split by article); {len(self.eval_windows)} test windows of "
            f"{d.window_len} tokens, {self.data_info['train_windows']} train / {len(self.val_windows)} val windows of {cfg.distill.seq_len}")
        self._done("prepare")

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def evaluate_teacher(self) -> None:
        """The teacher as given (fp32, HF generate): perplexity, prefill, decode b1/b8, size, peak memory."""
        from slimray.families.causal_lm.evaluate import argmax_predictions, dir_size_bytes, perplexity_and_agreement, probe_peak_memory

        s = self.cfg.search
        cache = self.run_dir / "cache"
        path = self.run_dir / "teacher_eval.json"
        argmax_file = cache / "teacher_argmax.safetensors"
        from safetensors.torch import load_file, save_file

        if path.exists() and argmax_file.exists():
            self.teacher_eval = json.loads(path.read_text())
            self.teacher_argmax = load_file(str(argmax_file))["argmax"]
            log(f"teacher: reusing its evaluation (perplexity {self.teacher_eval['perplexity']:.2f})")
            self._done("evaluate_teacher")
            return
        with torch_threads(1):
            self.teacher_argmax = argmax_predictions(self.teacher, self.eval_windows)
            ppl, agree = perplexity_and_agreement(self.teacher, self.eval_windows, reference_argmax=self.teacher_argmax)
            speeds = _time_model(self.teacher, runtime="hf_eager", search=s.model_dump())
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".teacher_argmax.tmp.{os.getpid()}"
        save_file({"argmax": self.teacher_argmax.contiguous()}, str(tmp))
        os.replace(tmp, argmax_file)
        peak = probe_peak_memory(self.teacher_dir, quant_method="none") if s.peak_memory else None
        self.teacher_eval = {"perplexity": ppl, "top1_agreement": agree, **speeds, "runtime": "hf_eager", "quantization": "none",
                             "size_bytes": dir_size_bytes(self.teacher_dir), "peak_memory_bytes": peak,
                             "num_layers": int(self.teacher.config.num_hidden_layers),
                             "params": int(sum(p.numel() for p in self.teacher.parameters()))}
        write_json_atomic(path, self.teacher_eval)
        t = self.teacher_eval
        log(f"teacher: perplexity {ppl:.2f} on {len(self.eval_windows)} test windows, prefill {t['prefill_tokens_per_s']:.0f} tok/s, "
            f"decode b1 {t['decode_tokens_per_s_b1']:.1f} / b8 {t['decode_tokens_per_s_b8']:.1f} tok/s, "
            f"{t['size_bytes'] / 1e6:.0f} MB" + (f", peak {peak / 2**20:.0f} MiB" if peak else ""))
        self._done("evaluate_teacher")

    # -- stage 3 ---------------------------------------------------------------------------------------------
    def derive_students(self) -> None:
        """Layer importance (KL when skipped) on validation windows; each student keeps its most important layers."""
        from slimray.families.causal_lm.artifacts import load_meta
        from slimray.families.causal_lm.prune import drop_layers, layer_importance, prune_depth, prune_width

        st = self.cfg.student
        n = int(self.teacher.config.num_hidden_layers)
        inter = int(self.teacher.config.intermediate_size)
        plans = st.plans(num_layers=n, intermediate_size=inter)
        if not plans:
            log("students: none configured (the search compresses the teacher only)")
            self._done("derive_students")
            return
        calib = self.val_windows[: st.num_importance_windows]
        imp_file = self.run_dir / "importance.json"
        if any(count < n for _, count, _ in plans):
            if imp_file.exists():
                self.importance = json.loads(imp_file.read_text())["importance"]
            else:
                with torch_threads(os.cpu_count() or 1):  # Ray's workers are idle now
                    self.importance = layer_importance(self.teacher, calib)
                write_json_atomic(imp_file, {"importance": self.importance, "windows": len(calib), "window_len": calib.shape[1],
                                             "what": "mean per-token KL(teacher || teacher without the layer), nats"})
        depth_cut: dict[int, tuple[list[int], torch.nn.Module | None]] = {}  # one depth cut per count, shared by its widths
        uses = collections.Counter(count for _, count, _ in plans)
        for name, count, w in plans:
            folder = self.run_dir / "students" / name
            if count not in depth_cut:
                if count == n:
                    depth_cut[count] = (list(range(n)), None)
                elif st.iterative:
                    model = copy.deepcopy(self.teacher)
                    with torch_threads(os.cpu_count() or 1):
                        depth_cut[count] = (prune_depth(model, calib, num_layers_to_drop=n - count, iterative=True).kept, model)
                else:
                    kept = sorted(sorted(range(n), key=lambda i: -self.importance[i])[:count])
                    depth_cut[count] = (kept, drop_layers(copy.deepcopy(self.teacher), keep=kept))
            kept, cut = depth_cut[count]
            uses[count] -= 1
            model, width = None, None
            if not folder.exists():
                base = cut if cut is not None else self.teacher
                model = base if base is cut and not uses[count] else copy.deepcopy(base)  # the last width takes the cut itself
                if not w.is_full():
                    width = prune_width(model, num_kv_heads=w.num_kv_heads, intermediate_size=w.neurons(inter),
                                        calibration=calib).model_dump(exclude={"kv_groups_kept"})
            else:
                width = load_meta(folder).reports.get("distill", {}).get("width")
            if not uses[count]:
                depth_cut.pop(count)
            dropped = [i for i in range(n) if i not in kept]
            self.students.append(StudentPlan(name=name, num_layers=count, kept=kept, folder=folder, width=width, model=model))
            log(f"students: {name} keeps {count} of {n} layers" + (f" by importance (dropped {dropped})" if dropped else "")
                + (f", width {width}" if width else "") + (" (already distilled)" if folder.exists() else ""))
        self._done("derive_students")

    # -- stage 4 ---------------------------------------------------------------------------------------------
    def distil(self) -> None:
        """Each student distilled on Ray Train (shared loop, CausalLMTask) from the teacher's cached top-k logits, or
        with the teacher in the loop (each worker loads it from ``self.teacher_dir``; optional hidden-state loss)."""
        from slimray.families.causal_lm.artifacts import LMArtifactMeta, save_lm
        from slimray.families.causal_lm.train import check_teacher_targets
        from slimray.compress.cpu import cpu_has_native_bf16
        from slimray.training.distill import TrainJob, run_training

        todo = [s for s in self.students if s.model is not None]
        if not todo:
            log("distil: nothing to distil" + (" (students reused)" if self.students else ""))
            self._done("distil")
            return
        d = self.cfg.distill
        in_loop = d.targets == "teacher_in_loop"
        if in_loop:
            windows, topk = self.train_windows, None
            for s in todo:  # before Ray starts: the losses must be able to compare student and teacher
                check_teacher_targets(s.model.config.to_dict(), self.teacher.config.to_dict(), hidden_weight=d.hidden_weight,
                                      layer_map=s.kept)
            log(f"distil: teacher in the loop (each worker loads {self.teacher_dir}), full-vocabulary KL"
                + (f" + {d.hidden_weight:g} x hidden-state MSE at the kept layers" if d.hidden_weight > 0 else ""))
        else:
            windows, values, indices = self._topk_cache()
            topk = {"topk_values": values.numpy(), "topk_indices": indices.numpy()}
        amp = d.mixed_precision == "bf16" or (d.mixed_precision == "auto" and cpu_has_native_bf16())
        val = self.val_windows[: d.num_val_windows]
        for s in todo:
            metrics_path = self.run_dir / f"distill_metrics_{s.name}.jsonl"
            task = {"hf_config": s.model.config.to_dict(), "temperature": d.temperature, "ce_weight": d.ce_weight,
                    "warmup_steps": d.warmup_steps, "bf16_autocast": amp, "targets": d.targets}
            if in_loop:  # the folder, not the weights, goes to the workers; student layer i <- teacher layer kept[i]
                task.update(teacher_path=str(Path(self.teacher_dir).resolve()), hidden_weight=d.hidden_weight, layer_map=list(s.kept))
            job = TrainJob(
                label=f"distil {s.name}", family="causal_lm", run_name=f"{self.cfg.name}-distil-{s.name}",
                storage_path=str((self.run_dir / "ray").resolve()), spec={}, epochs=d.epochs, batch_size=d.batch_size, lr=d.lr,
                weight_decay=d.weight_decay, num_workers=d.num_workers, max_failures=d.max_failures, seed=d.seed,
                metrics_path=str(metrics_path), task=task,
            )
            log(f"distil: {s.name} on Ray Train, {d.num_workers} workers x batch {d.batch_size} x {d.seq_len} tokens, "
                f"{d.epochs} epochs x {-(-len(windows) // (d.batch_size * d.num_workers))} steps, lr {d.lr}"
                + (", bf16 autocast" if amp else ""))
            t0 = time.perf_counter()
            data = {"windows": windows.numpy(), **(topk or {}), "val_windows": val.numpy()}
            trained, metrics = run_training(job, data, init_state={k: v.clone() for k, v in s.model.state_dict().items()})
            report = {"num_layers": s.num_layers, "kept_layers": s.kept, "width": s.width, **distill_settings(d),
                      "steps_per_worker": d.epochs * -(-len(windows) // (d.batch_size * d.num_workers)),
                      "seconds": time.perf_counter() - t0, "last_metrics": {k: v for k, v in metrics.items()
                                                                           if isinstance(v, (int, float, str))}}
            save_lm(trained, self.tokenizer, s.folder, meta=LMArtifactMeta(reports={"distill": report}))
            s.model = None
            log(f"distil: {s.name} done in {report['seconds']:.0f}s, val perplexity {metrics.get('val_perplexity', float('nan')):.2f}")
        self._done("distil")

    def _topk_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's top-k logits on the training windows: RUN/cache/teacher_topk.safetensors, built once."""
        from slimray.families.causal_lm.kd import cache_teacher_topk, load_topk, save_topk

        d = self.cfg.distill
        topk_file = self.run_dir / "cache" / "teacher_topk.safetensors"
        if topk_file.exists():
            windows, values, indices = load_topk(topk_file)
            log(f"distil: reusing the teacher's top-{d.top_k} cache ({len(windows)} windows)")
        else:
            t0 = time.perf_counter()
            windows = self.train_windows
            with torch_threads(os.cpu_count() or 1):
                values, indices = cache_teacher_topk(self.teacher, windows, k=d.top_k)
            tmp = topk_file.with_name(f".{topk_file.name}.tmp.{os.getpid()}")
            topk_file.parent.mkdir(parents=True, exist_ok=True)
            save_topk(tmp, windows, values, indices)
            os.replace(tmp, topk_file)
            log(f"distil: teacher top-{d.top_k} logits cached for {len(windows)} windows of {windows.shape[1]} tokens "
                f"in {time.perf_counter() - t0:.0f}s ({values.element_size() * d.top_k + indices.element_size() * d.top_k} bytes/token)")
        return windows, values, indices

    # -- stage 5 ---------------------------------------------------------------------------------------------
    def search(self) -> None:
        """Ray Tune trials, then the finalists and the teacher re-timed side by side in the driver."""
        from slimray.sweep.lm_search import candidate_grid, candidate_key, run_search

        s = self.cfg.search
        model_dirs = {TEACHER: str(self.teacher_dir), **{st.name: str(st.folder) for st in self.students}}
        searched = [m for m in model_dirs if m != TEACHER or s.include_teacher] or [TEACHER]  # no student: the teacher
        quants, why = searched_quant_methods(self.cfg)
        if why:
            log(f"search: bf16 left out: {why}")
        candidates = candidate_grid(searched, sparsities=s.sparsities, quant_methods=quants, runtimes=s.runtimes,
                                    compiled_quant_methods=s.compiled_quant_methods, sparse_quant_methods=s.sparse_quant_methods)
        log(f"search: {len(candidates)} candidates = {searched} x {s.sparsities} x {quants} x {s.runtimes} on Ray Tune "
            f"({s.max_concurrent_trials} at once, 1 thread each)")
        self.rows = run_search(run_dir=self.run_dir, candidates=candidates, model_dirs=model_dirs, windows=self.eval_windows,
                               reference_argmax=self.teacher_argmax, search=s.model_dump())
        t_ppl = self.teacher_eval["perplexity"]
        ok = [r for r in self.rows if r["status"] == "ok"]
        for r in self.rows:
            if r["status"] != "ok":
                log(f"trial {r['key']} failed: {str(r.get('error', ''))[:160]} -> {r.get('advice')}")
        if not ok:
            from slimray.sweep.select import sweep_failure

            raise sweep_failure(self.rows)
        for r in ok:
            r["accuracy"] = -r["perplexity"]  # the shared selection maximises accuracy: ppl <= budget x teacher's
            r["ms_per_token_b1"] = 1000.0 / r["decode_tokens_per_s_b1"]
            r["perplexity_ratio"] = r["perplexity"] / t_ppl
            r["within_budget"] = r["perplexity"] <= s.ppl_budget * t_ppl + 1e-9
        feasible = sorted((r for r in ok if r["within_budget"]), key=lambda r: r["ms_per_token_b1"])
        finalists = feasible[: s.num_finalists]
        given = next((r for r in ok if r["key"] == AS_GIVEN), None)
        if s.min_prefill_speedup is not None and given is not None:  # also the fastest that reach the prefill floor in their trial
            floor = s.min_prefill_speedup * given["prefill_tokens_per_s"]
            finalists += [r for r in feasible if r["prefill_tokens_per_s"] >= floor and r not in finalists][: s.num_finalists]
        finalists = finalists or sorted(ok, key=lambda r: r["perplexity"])[:1]
        log(f"search: {len(ok)}/{len(self.rows)} trials ok, {len(feasible)} within {s.ppl_budget}x the teacher's perplexity; "
            f"re-timing {[r['key'] for r in finalists]} side by side with the teacher ({s.num_rounds} round(s) at least)")

        # the teacher as given, the finalists, and the teacher in each student finalist's quantization + runtime
        timed: dict[str, tuple[str, str, str, str]] = {AS_GIVEN: (TEACHER, "none", "hf_eager", "none")}
        for r in finalists:
            timed[r["key"]] = (r["model"], r["quantization"], r["runtime"], r.get("sparsity", "none"))
            if r["model"] != TEACHER or r.get("sparsity", "none") != "none":  # the dense teacher in the same quantization + runtime
                timed[candidate_key(TEACHER, r["quantization"], r["runtime"])] = (TEACHER, r["quantization"], r["runtime"], "none")
            if r["runtime"] == "vllm":  # the uncompressed teacher served by the same engine: what the compression adds
                timed[candidate_key(TEACHER, "bf16", "vllm")] = (TEACHER, "bf16", "vllm", "none")
        speeds = self._time_side_by_side(timed, model_dirs)
        for r in finalists:
            r["final"] = speeds[r["key"]]
            r["ms_per_token_b1"] = 1000.0 / r["final"]["decode_tokens_per_s_b1"]
        decode_rounds = {k: r["decode_tokens_per_s_b1"] for k, r in self.timing_rounds.items()}
        winner, is_feasible = choose_winner(finalists, teacher_ppl=t_ppl, ppl_budget=s.ppl_budget,
                                            teacher_prefill=speeds[AS_GIVEN]["prefill_tokens_per_s"],
                                            min_prefill_speedup=s.min_prefill_speedup, rounds=decode_rounds, noise_margin=s.noise_margin)
        if winner.get("tied_with"):
            log(f"search: {winner['key']} ties on decode speed with {winner['tied_with']} (within noise over "
                f"{len(decode_rounds[winner['key']])} side-by-side rounds): the smallest of them wins")
        self.final = {"speeds": speeds, "finalists": [r["key"] for r in finalists], "winner": winner, "feasible": is_feasible,
                      "timing_rounds": self.timing_rounds}
        self._save_winner(winner)
        self._done("search")

    def _time_side_by_side(self, timed: dict[str, tuple[str, str, str, str]], model_dirs: dict[str, str]) -> dict[str, dict[str, float]]:
        from slimray.families.causal_lm.artifacts import load_lm
        from slimray.families.causal_lm.quantize import quantize_lm
        from slimray.families.causal_lm.sparsity import sparsify_lm

        s = self.cfg.search
        models: dict[str, Any] = {}
        for key, (m, q, rt, sp) in timed.items():
            if rt == "vllm":
                models[key] = self._vllm_timer(key, model_dirs[m], quant=q)
                continue
            base = self.teacher if m == TEACHER and q == "none" and sp == "none" else load_lm(model_dirs[m])[0]
            if sp != "none":
                base = sparsify_lm(base, sparsity=sp, keep_dense=s.sparsity_keep_dense, inplace=True)
            models[key] = quantize_lm(base, method=q, keep_float=s.keep_float, inplace=base is not self.teacher)
        try:
            return self._timing_rounds(timed, models)
        finally:
            self._stop_vllm_timers(models)

    def _vllm_timer(self, key: str, model_dir: str, *, quant: str):
        """The candidate stored as the winner would be (``RUN/timing/<key>``), loaded by vLLM in an actor."""
        from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, load_lm, save_lm
        from slimray.sweep.lm_search import start_vllm_timer

        s = self.cfg.search
        folder = self.run_dir / "timing" / key
        if not (folder / "slimray_lm.json").exists():
            model, tok, _ = load_lm(model_dir)
            save_lm(model, tok, folder, meta=LMArtifactMeta(quant_method=quant, keep_float=s.keep_float, runtime="vllm",
                                                            storage=compact_storage(quant)))
            del model
        log(f"timing: loading {key} in vLLM")
        return start_vllm_timer(folder, quant_method=quant, num_threads=1,
                                max_model_len=max(s.prefill_len, 16 + s.num_new_tokens) + 16)

    def _stop_vllm_timers(self, models: dict[str, Any]) -> None:
        import shutil

        import ray

        for key, m in models.items():
            if isinstance(m, ray.actor.ActorHandle):
                ray.kill(m)
        shutil.rmtree(self.run_dir / "timing", ignore_errors=True)

    def _timing_rounds(self, timed: dict[str, tuple[str, str, str, str]], models: dict[str, Any]) -> dict[str, dict[str, float]]:
        s = self.cfg.search
        from slimray.sweep.select import ranking_stable, rounds_summary

        rounds: dict[str, dict[str, list[float]]] = {key: collections.defaultdict(list) for key in timed}
        keys = list(timed)
        max_rounds = s.most_rounds
        with torch_threads(1):
            for i in range(max_rounds):
                for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # interleaved, the order rotated each round
                    for k, v in _time_model(models[key], runtime=timed[key][2], search=s.model_dump()).items():
                        rounds[key][k].append(v)
                decode = {k: r["decode_tokens_per_s_b1"] for k, r in rounds.items()}
                if i + 1 >= s.num_rounds and (len(keys) == 1 or ranking_stable(decode)):
                    break
        self.timing_rounds = {key: dict(r) for key, r in rounds.items()}
        best = {key: {k: max(v) for k, v in r.items()} for key, r in rounds.items()}
        for key, v in best.items():
            d = rounds_summary(rounds[key]["decode_tokens_per_s_b1"])
            log(f"timing: {key}: prefill {v['prefill_tokens_per_s']:.0f} tok/s, decode b1 {v['decode_tokens_per_s_b1']:.1f} "
                f"(spread {100 * d['spread']:.0f}% over {d['num_rounds']} rounds), b8 {v['decode_tokens_per_s_b8']:.1f} tok/s")
        return best

    def _save_winner(self, winner: dict[str, Any]) -> None:
        """``RUN/winner`` (save_lm: a standard HF folder, compressed-tensors for int8 / int4, that vLLM and plain
        transformers load), atomic; a sparse winner, whose packing only slimray reads, also gets ``RUN/export``
        (``export_hf``: the plain float folder)."""
        import shutil

        from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, export_hf, load_lm, save_lm

        s = self.cfg.search
        from slimray.families.causal_lm.sparsity import sparsify_lm, sparsity_report

        base, tok, base_meta = load_lm(winner["model_dir"])
        sp = winner.get("sparsity", "none")
        if sp != "none":
            base = sparsify_lm(base, sparsity=sp, keep_dense=s.sparsity_keep_dense, inplace=True)
        reports = dict(base_meta.reports)
        reports.update(search={"key": winner["key"], "perplexity": winner["perplexity"], "model": winner["model"],
                               "kept_layers": next((st.kept for st in self.students if st.name == winner["model"]), None)})
        if sp != "none":
            reports["sparsity"] = sparsity_report(base, sparsity=sp, keep_dense=s.sparsity_keep_dense)
        meta = LMArtifactMeta(quant_method=winner["quantization"], keep_float=s.keep_float, runtime=winner["runtime"],
                              storage=compact_storage(winner["quantization"], sparsity=sp), sparsity=sp,
                              sparsity_keep_dense=s.sparsity_keep_dense, reports=reports)
        for name in ("winner", "export"):
            if (self.run_dir / name).exists():  # a rerun's search may choose again: replace whole folders
                shutil.rmtree(self.run_dir / name)
        save_lm(base, tok, self.run_dir / "winner", meta=meta)
        log(f"winner: {winner['key']} -> {self.run_dir / 'winner'} ({meta.storage} storage)")
        if sp != "none":
            export_hf(base, tok, self.run_dir / "export", dtype=torch.bfloat16 if winner["quantization"] == "bf16" else torch.float32)
            log(f"the winner's sparse packing is slimray's own: plain HF float export -> {self.run_dir / 'export'}")

    # -- stage 6 ---------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        from slimray.families.causal_lm.artifacts import load_lm, load_meta
        from slimray.sweep.lm_search import candidate_key
        from slimray.families.causal_lm.evaluate import dir_size_bytes, perplexity_and_agreement, probe_peak_memory

        cfg, s, run_dir = self.cfg, self.cfg.search, self.run_dir
        from slimray.sweep.select import rounds_summary

        w, speeds, t = self.final["winner"], self.final["speeds"], self.teacher_eval
        rounds = self.final.get("timing_rounds", {})
        num_rounds = min((len(r["decode_tokens_per_s_b1"]) for r in rounds.values()), default=s.num_rounds)
        reloaded, _, meta = load_lm(run_dir / "winner")
        with torch_threads(1):
            w_ppl, w_agree = perplexity_and_agreement(reloaded, self.eval_windows, reference_argmax=self.teacher_argmax)
        del reloaded
        w_size, t_size = dir_size_bytes(run_dir / "winner"), t["size_bytes"]
        w_peak = probe_peak_memory(run_dir / "winner", quant_method="artifact") if s.peak_memory else None
        teacher_given = speeds[AS_GIVEN]
        same_key = (w["key"] if w["model"] == TEACHER and w.get("sparsity", "none") == "none"
                    else candidate_key(TEACHER, w["quantization"], w["runtime"]))  # the dense teacher
        teacher_same = speeds.get(same_key)
        wf = w["final"]

        def ratios(ref: dict[str, float] | None) -> dict[str, float] | None:
            if ref is None:
                return None
            return {k: wf[k] / ref[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")}

        teacher_row = {**{k: t[k] for k in ("perplexity", "top1_agreement", "size_bytes", "peak_memory_bytes", "num_layers", "params")},
                       **teacher_given, "quantization": "none", "runtime": "hf_eager", "first_pass": {
                           k: t[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")}}
        winner_row = {"key": w["key"], "model": w["model"], "quantization": w["quantization"], "runtime": w["runtime"],
                      "sparsity": meta.sparsity,
                      "storage": meta.storage, "perplexity": w_ppl, "top1_agreement": w_agree, "trial_perplexity": w["perplexity"],
                      **wf, "size_bytes": w_size, "peak_memory_bytes": w_peak, "num_layers": w["num_layers"], "params": w["params"],
                      "kept_layers": meta.reports.get("search", {}).get("kept_layers"), "tied_with": w.get("tied_with", [])}
        vs_given, vs_same = ratios(teacher_given), ratios(teacher_same)
        vllm_key = candidate_key(TEACHER, "bf16", "vllm")  # timed when a vLLM candidate was a finalist
        vs_vllm = ratios(speeds.get(vllm_key)) if w["key"] != vllm_key else None
        wall = time.perf_counter() - self.t_start
        targets = {
            "decode_b1_speedup": (vs_given["decode_tokens_per_s_b1"], 2.0, ">="),
            "prefill_speedup": (vs_given["prefill_tokens_per_s"], 1.5, ">="),
            "perplexity_ratio": (w_ppl / t["perplexity"], s.ppl_budget, "<="),
            "size_ratio": (t_size / w_size, 2.0, ">="),
            "wall_time_s": (wall, 2400.0, "<="),
        }
        if vs_vllm is not None:  # the gain is the compression's, not only the engine's
            targets["decode_b1_speedup_vs_vllm_teacher"] = (vs_vllm["decode_tokens_per_s_b1"], 1.5, ">=")
        report: dict[str, Any] = {
            "name": cfg.name, "family": "causal_lm", "recipe": cfg.recipe,
            "teacher_source": cfg.teacher.source, "data": self.data_info,
            "evaluation": {"perplexity": f"token-level over {len(self.eval_windows)} held-out windows of {cfg.data.window_len} tokens "
                                         "(stride = window, first token unscored)",
                           "speed": f"1 torch thread; prefill one [1, {s.prefill_len}] forward; decode {s.num_new_tokens} new tokens "
                                    f"after a 16-token prompt, prefill subtracted; median of {s.num_repeats}, best of "
                                    f"{num_rounds} interleaved side-by-side round(s) (at least {s.num_rounds}, more "
                                    f"until the leader held two rounds, at most {s.most_rounds}); a finalist not faster "
                                    f"beyond noise ({s.noise_margin:.0%} median gap, 3 rounds in 4) ties, the smaller wins"},
            "teacher": teacher_row, "winner": winner_row, "winner_feasible": self.final["feasible"],
            "speedup_vs_teacher_as_given": vs_given,
            "speedup_vs_teacher_same_runtime": vs_same, "teacher_same_runtime_key": same_key if teacher_same else None,
            "speedup_vs_teacher_vllm": vs_vllm, "teacher_vllm_key": vllm_key if vs_vllm is not None else None,
            "side_by_side": speeds, "finalists": self.final["finalists"],
            "side_by_side_rounds": {key: {k: rounds_summary(v) for k, v in r.items()} for key, r in rounds.items()},
            "targets": {k: {"value": v, "target": tg, "met": (v >= tg - 1e-9) if op == ">=" else (v <= tg + 1e-9)}
                        for k, (v, tg, op) in targets.items()},
            "importance": self.importance,
            "students": [{"name": st.name, "num_layers": st.num_layers, "kept_layers": st.kept, "width": st.width,
                          "distill": _distill_settings_of(load_meta(st.folder).reports.get("distill", {})),
                          "distill_metrics": _read_jsonl(run_dir / f"distill_metrics_{st.name}.jsonl")} for st in self.students],
            "trials": self.rows, "pareto_front": [row["key"] for row in lm_pareto_front(self.rows)],
            "int4": _int4_note(cfg), "sparsity": _sparsity_note(cfg), "bf16": _bf16_note(cfg),
            "stage_seconds": self.stage_s, "wall_s": wall,
        }
        write_json_atomic(run_dir / "report.json", report)
        (run_dir / ".report.md.tmp").write_text(render_markdown(report))
        os.replace(run_dir / ".report.md.tmp", run_dir / "report.md")
        try:
            write_png(report, run_dir / "report.png")
        except Exception as err:  # noqa: BLE001 - a plot must not fail the run
            log(f"report: no plot ({type(err).__name__}: {err})")
        missed = [k for k, v in report["targets"].items() if not v["met"]]
        log(f"done in {wall:.0f}s: winner {w['key']} (ppl {w_ppl:.2f} vs {t['perplexity']:.2f}, decode b1 "
            f"{vs_given['decode_tokens_per_s_b1']:.2f}x, prefill {vs_given['prefill_tokens_per_s']:.2f}x, "
            f"{t_size / w_size:.2f}x smaller) -> {run_dir / 'report.md'}" + (f"; missed: {missed}" if missed else "; all targets met"))
        self._done("report")
        return report


def choose_winner(finalists: list[dict[str, Any]], *, teacher_ppl: float, ppl_budget: float, teacher_prefill: float,
                  min_prefill_speedup: float | None = None, rounds: dict[str, list[float]] | None = None,
                  noise_margin: float = 0.03) -> tuple[dict[str, Any] | None, bool]:
    """The one winner rule (``slimray.sweep.select.choose``) on the finalists' side-by-side timing: the fastest
    batch-1 decode (``ms_per_token_b1``) with perplexity <= ``ppl_budget`` x the teacher's, ties to the smaller;
    with ``min_prefill_speedup`` only finalists whose ``final`` prefill tok/s reaches it count as feasible. Given the
    side-by-side ``rounds`` (decode tok/s per round, by key), a feasible finalist the fastest does not beat beyond
    noise (``select.beats``) ties with it, and the smallest of the tied wins (``tied_with`` names the others)."""
    from slimray.sweep.select import choose

    pool = finalists
    if min_prefill_speedup is not None:
        for r in finalists:
            r["meets_prefill"] = r["final"]["prefill_tokens_per_s"] >= min_prefill_speedup * teacher_prefill - 1e-9
        pool = [r for r in finalists if r["meets_prefill"]]
    rule = dict(quality_key="perplexity", higher_is_better=False, floor=ppl_budget * teacher_ppl, speed_key="ms_per_token_b1",
                faster="min", rounds=rounds, margin=noise_margin)
    winner, ok, tied = choose(pool, **rule)
    met = ok
    if winner is None or not ok:  # nothing meets every constraint: the perplexity rule alone, flagged infeasible
        winner, met, tied = choose(finalists, **rule)
        ok = False
    if rounds and met:  # the noise rule held (on either path): a win inside the noise is a tie, the smaller wins
        winner["tied_with"] = [r["key"] for r in tied]
    return winner, ok


DISTILL_SETTINGS = ("targets", "top_k", "hidden_weight", "temperature", "ce_weight")


def distill_settings(d: Any) -> dict[str, Any]:
    """What a student's distill report records of ``LMDistillConfig`` ``d``: the targets and the loss weights
    (``top_k`` only for the cache: the teacher in the loop gives the full vocabulary)."""
    return {"targets": d.targets, "top_k": d.top_k if d.targets == "topk_cache" else None, "hidden_weight": d.hidden_weight,
            "temperature": d.temperature, "ce_weight": d.ce_weight}


def _distill_settings_of(report: dict[str, Any]) -> dict[str, Any] | None:
    """The settings part of a student's distill report; a student distilled before ``targets`` was recorded (only
    the top-k cache existed then) reads as that. None for a report without one."""
    if not report:
        return None
    out = {k: report[k] for k in DISTILL_SETTINGS if k in report}
    out.setdefault("targets", "topk_cache")
    out.setdefault("hidden_weight", 0.0)
    return out


def describe_distill(settings: dict[str, Any]) -> str:
    """report.md's words for a student's distill settings (``distill_settings``)."""
    if settings["targets"] == "teacher_in_loop":
        text = "the teacher in the loop (full-vocabulary KL)"
    else:
        k = settings.get("top_k")
        text = f"the teacher's cached top-{k} logits" if k else "the teacher's cached top-k logits"
    if settings.get("hidden_weight"):
        text += f" + {settings['hidden_weight']:g} x hidden-state MSE at the kept layers"
    if settings.get("ce_weight"):
        text += f" + {settings['ce_weight']:g} x next-token cross-entropy"
    if settings.get("temperature") not in (None, 1.0):
        text += f", temperature {settings['temperature']:g}"
    return f"{text} (distill.targets {settings['targets']}, hidden_weight {settings.get('hidden_weight', 0.0):g})"


def _verbose() -> bool:
    from slimray import console

    return console.verbose()


def _sparsity_note(cfg: LMPipelineConfig) -> str | None:
    """What the report says about sparsity: None when not searched."""
    sparse = [sp for sp in cfg.search.sparsities if sp != "none"]
    if not sparse:
        return None
    return (f"searched {sparse} (magnitude pruning of the Linear layers but {cfg.search.sparsity_keep_dense}, no recovery "
            "training) with " + str([q for q in cfg.search.quant_methods if q in cfg.search.sparse_quant_methods])
            + "; sparse layers are stored packed (2:4: kept values + 2-bit positions; unstructured: values + bitmask), "
            "so sparsity is for size on disk and for GPU speed (2:4 sparse tensor cores): on CPU the weights run dense "
            "and no CPU speedup is claimed, whatever the trial timings show")


def searched_quant_methods(cfg: LMPipelineConfig) -> tuple[list[str], str | None]:
    """``search.quant_methods`` as searched: bf16 left out on a CPU without native bf16 (its prefill ran 41-49 tok/s
    against fp32's 316 on an AVX2-only box, so it could only lose, and it won as the least bad finalist), with why."""
    return without_slow_bf16(list(cfg.search.quant_methods))


def _bf16_note(cfg: LMPipelineConfig) -> str | None:
    """What the report says about bf16 when the search left it out; None otherwise."""
    why = searched_quant_methods(cfg)[1]
    return None if why is None else (f"left out of the search: {why}; it stays searched on a CPU with AVX512-BF16 or "
                                     "AMX-BF16 and on GPU")


def _int4_note(cfg: LMPipelineConfig) -> str:
    searched = "int4_weight_only" in cfg.search.quant_methods
    what = ("searched as int4_weight_only (torch's CPU int4 kernel, groups of 32 inputs, bf16 activations)" if searched
            else "not searched (add int4_weight_only to search.quant_methods)")
    if cfg.teacher.source == "smollm2":
        return (f"{what}; this teacher's GGUF weights were 4-bit (Q4_1) before dequantization, so int4 looks nearly free "
                "on it: do not read its perplexity as what int4 costs a model trained in float")
    return what


def _time_model(model: Any, *, runtime: str, search: dict[str, Any]) -> dict[str, float]:
    """Prefill and decode b1 / b8 tok/s of an HF model in ``runtime``, or of a ``VllmTimer`` actor (runtime vllm)."""
    from slimray.families.causal_lm.evaluate import decode_tokens_per_s, prefill_tokens_per_s

    if runtime == "vllm":
        import ray

        return ray.get(model.time.remote(prefill_len=search["prefill_len"], num_new_tokens=search["num_new_tokens"],
                                         num_repeats=search["num_repeats"]))

    out = {"prefill_tokens_per_s": prefill_tokens_per_s(model, prompt_len=search["prefill_len"], num_repeats=search["num_repeats"])}
    for b in (1, 8):
        out[f"decode_tokens_per_s_b{b}"] = decode_tokens_per_s(model, runtime=runtime, batch_size=b, num_new_tokens=search["num_new_tokens"],
                                                               num_repeats=search["num_repeats"])
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def render_markdown(r: dict[str, Any]) -> str:
    t, w, g, same = r["teacher"], r["winner"], r["speedup_vs_teacher_as_given"], r["speedup_vs_teacher_same_runtime"]
    lines = [
        f"# {r['name']}: causal LM compression report", "",
        "Data: " + ", ".join(f"{v} {k}" for k, v in r["data"]["documents"].items()) + f" documents ({r['data']['split']}). "
        f"Perplexity: {r['evaluation']['perplexity']}. "
        f"Speed: {r['evaluation']['speed']}.", "",
        "| model | perplexity | top-1 agreement | prefill tok/s | decode tok/s b1 | decode tok/s b8 | size MB | peak MiB | decode b1 vs teacher as given | vs teacher in the winner's quant/runtime |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def peak(e):
        return "-" if e.get("peak_memory_bytes") is None else f"{e['peak_memory_bytes'] / 2**20:.0f}"

    lines.append(f"| teacher (fp32, hf_eager) | {t['perplexity']:.2f} | {t['top1_agreement']:.3f} | {t['prefill_tokens_per_s']:.0f} | "
                 f"{t['decode_tokens_per_s_b1']:.1f} | {t['decode_tokens_per_s_b8']:.1f} | {_mb(t['size_bytes'])} | {peak(t)} | 1.00x | |")
    lines.append(f"| winner ({w['key']}, {w['storage']} storage) | {w['perplexity']:.2f} | {w['top1_agreement']:.3f} | "
                 f"{w['prefill_tokens_per_s']:.0f} | {w['decode_tokens_per_s_b1']:.1f} | {w['decode_tokens_per_s_b8']:.1f} | "
                 f"{_mb(w['size_bytes'])} | {peak(w)} | {g['decode_tokens_per_s_b1']:.2f}x | "
                 + (f"{same['decode_tokens_per_s_b1']:.2f}x ({r['teacher_same_runtime_key']})" if same else "-") + " |")
    lines += ["", "Speedups of the winner (side-by-side timing):", "",
              "| reference | prefill | decode b1 | decode b8 |", "| --- | --- | --- | --- |",
              f"| teacher as given (fp32, hf_eager) | {g['prefill_tokens_per_s']:.2f}x | {g['decode_tokens_per_s_b1']:.2f}x | {g['decode_tokens_per_s_b8']:.2f}x |"]
    if same:
        lines.append(f"| teacher in the winner's quantization and runtime ({r['teacher_same_runtime_key']}) | "
                     f"{same['prefill_tokens_per_s']:.2f}x | {same['decode_tokens_per_s_b1']:.2f}x | {same['decode_tokens_per_s_b8']:.2f}x |")
    vv = r.get("speedup_vs_teacher_vllm")
    if vv:
        lines.append(f"| the uncompressed teacher in vLLM ({r['teacher_vllm_key']}): what the compression adds beyond the engine | "
                     f"{vv['prefill_tokens_per_s']:.2f}x | {vv['decode_tokens_per_s_b1']:.2f}x | {vv['decode_tokens_per_s_b8']:.2f}x |")
    spread = r.get("side_by_side_rounds") or {}
    if spread:
        lines += ["", "Side-by-side rounds (decode b1 tok/s: best / median / worst round, spread = (best - worst) / best):", "",
                  "| model | best | median | worst | spread | rounds |", "| --- | --- | --- | --- | --- | --- |"]
        for key, m in spread.items():
            d = m["decode_tokens_per_s_b1"]
            lines.append(f"| {key} | {d['best']:.1f} | {d['median']:.1f} | {d['min']:.1f} | {100 * d['spread']:.0f}% | {d['num_rounds']} |")
    if w.get("tied_with"):
        lines += ["", f"The winner ties on decode speed with {', '.join(w['tied_with'])}: the fastest of them did not beat "
                  "the others beyond noise in the side-by-side rounds, so the smallest model was chosen."]
    if w.get("sparsity", "none") != "none":
        lines += ["", f"The winner is {w['sparsity']} sparse: on CPU its weights run as dense tensors, so its speed against "
                  "the dense teacher in the same quantization and runtime is timing noise, not a speedup from sparsity "
                  "(none is claimed on CPU); the sparsity buys size on disk, and GPU speed where 2:4 kernels run (2:4 only)."]
    lines += ["", "## Targets (issue #17)", "", "| target | value | required | met |", "| --- | --- | --- | --- |"]
    for k, v in r["targets"].items():
        op = "<=" if k in ("perplexity_ratio", "wall_time_s") else ">="
        lines.append(f"| {k} | {v['value']:.3f} | {op} {v['target']:g} | {'yes' if v['met'] else 'no'} |")
    front = lm_pareto_front(r["trials"])
    if front:
        budget = r["targets"]["perplexity_ratio"]["target"]
        lines += ["", "## Pareto front: perplexity vs decode b1", "",
                  "Trials no other trial beats on both held-out perplexity and batch-1 decode speed (trial figures, "
                  "first pass), fastest first:", "",
                  "| key | model | perplexity | x teacher | decode b1 tok/s | within the budget |", "| --- | --- | --- | --- | --- | --- |"]
        for row in front:
            lines.append(f"| {row['key']} | {row['model']} | {row['perplexity']:.2f} | {row['perplexity_ratio']:.3f} | "
                         f"{row['decode_tokens_per_s_b1']:.1f} | {'yes' if row['perplexity_ratio'] <= budget + 1e-9 else 'no'} |")
        names = [st["name"] for st in r["students"]]
        inside = sorted({row["key"] for row in front if row["model"] != "teacher" and row["perplexity_ratio"] <= budget + 1e-9})
        outside = sorted({row["key"] for row in front if row["model"] != "teacher"} - set(inside))
        if inside or outside:
            lines += ["", "Distilled students on the front: "
                      + (f"within the perplexity budget {', '.join(inside)}" if inside else "none within the perplexity budget")
                      + (f"; beyond it {', '.join(outside)}" if outside else "") + "."]
        elif names:
            lines += ["", f"No distilled student is on the front: every trial of {', '.join(names)} is beaten on both "
                      "perplexity and decode speed by a trial of the teacher."]
    if r["students"]:
        lines += ["", "## Students", ""]
        for st in r["students"]:
            m = st["distill_metrics"]
            lines.append(f"- {st['name']}: {st['num_layers']} layers kept {st['kept_layers']}"
                         + (f", width {st['width']}" if st["width"] else "")
                         + (f"; distilled from {describe_distill(st['distill'])}" if st.get("distill") else "")
                         + "; val perplexity per epoch: " + (", ".join(f"{e.get('val_perplexity', float('nan')):.2f}" for e in m) or "-"))
        if r.get("importance"):
            lines.append("- layer importance (KL nats/token when skipped): "
                         + ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(r["importance"])))
    lines += ["", "## All candidates (trial figures: first pass, trials ran concurrently)", "",
              "| key | perplexity | x teacher | top-1 agr. | prefill tok/s | decode b1 tok/s | size MB | trial s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["trials"]:
        if row["status"] != "ok":
            lines.append(f"| {row['key']} | error: {str(row.get('error', ''))[:100]}"
                         + (f" -> {row['advice']}" if row.get("advice") else "") + " | | | | | | |")
            continue
        lines.append(f"| {row['key']} | {row['perplexity']:.2f} | {row['perplexity_ratio']:.3f} | {row['top1_agreement']:.3f} | "
                     f"{row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s_b1']:.1f} | {_mb(row['size_bytes'])} | "
                     f"{row['trial_seconds']:.0f} |")
    lines += ["", f"int4: {r['int4']}.", ""]
    if r.get("sparsity"):
        lines += [f"Sparsity: {r['sparsity']}.", ""]
    if r.get("bf16"):
        lines += [f"bf16: {r['bf16']}.", ""]
    lines += [
              "Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["stage_seconds"].items()) + f"; total {r['wall_s']:.0f}s."]
    return "\n".join(lines) + "\n"


def lm_pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials no other trial beats on both perplexity (lower) and batch-1 decode tok/s (higher), fastest first."""
    from slimray.sweep.select import non_dominated

    front = non_dominated(trials, goals={"perplexity": "min", "decode_tokens_per_s_b1": "max"})
    return sorted(front, key=lambda t: -t["decode_tokens_per_s_b1"])


def write_png(r: dict[str, Any], path: Path) -> None:
    """Perplexity vs batch-1 decode tok/s of every trial, the budget line, the teacher and the winner."""
    from slimray.report import _plt, _save_png

    plt = _plt()
    ok = [t for t in r["trials"] if t["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for q in sorted({(t["quantization"], t["runtime"], t.get("sparsity", "none")) for t in ok}):
        pts = [t for t in ok if (t["quantization"], t["runtime"], t.get("sparsity", "none")) == q]
        label = f"{q[0]} @ {q[1]}" + ("" if q[2] == "none" else f" ({q[2]})")
        ax.scatter([t["decode_tokens_per_s_b1"] for t in pts], [t["perplexity"] for t in pts], label=label, s=36)
    front = sorted(lm_pareto_front(r["trials"]), key=lambda t: t["decode_tokens_per_s_b1"])
    if front:
        ax.plot([t["decode_tokens_per_s_b1"] for t in front], [t["perplexity"] for t in front], color="k", lw=0.8,
                ls="--", drawstyle="steps-post", label="Pareto front", zorder=1)
    students = [t for t in ok if t.get("model", "teacher") != "teacher"]
    if students:
        ax.scatter([t["decode_tokens_per_s_b1"] for t in students], [t["perplexity"] for t in students], s=90,
                   facecolors="none", edgecolors="k", lw=0.8, label="distilled student", zorder=4)
    tp = r["teacher"]["perplexity"]
    ax.axhline(tp, color="grey", lw=0.8, label="teacher")
    budget = r["targets"]["perplexity_ratio"]["target"] * tp
    ax.axhline(budget, color="red", lw=0.8, ls=":", label="perplexity budget")
    wt = next((t for t in ok if t["key"] == r["winner"]["key"]), None)
    if wt:
        ax.scatter([wt["decode_tokens_per_s_b1"]], [wt["perplexity"]], marker="*", s=260, c="gold", edgecolors="k", zorder=5, label="winner")
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s at batch 1 (trial timing)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"slimray causal_lm search: {r['recipe'] or r['name']} ({len(ok)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(fig, path)
