"""The causal-LM family's hooks for the shared pipeline (``slimray.families.recipe.Recipe``).

SmolLM2-135M-Instruct (its packaged GGUF converted once into ``RUN/teacher``) or a local Hugging Face folder is the
teacher. The data are windows of tokens split by article (test windows score every candidate; validation windows
score layer importance and the students' per-epoch perplexity; training windows feed distillation). Students keep
the teacher's most important layers (KL when a layer is skipped) and optionally fewer KV groups and MLP neurons; each
is distilled on Ray Train from the teacher's cached top-k logits or with the teacher in the loop. The search is
starting model x sparsity x quantization x runtime (``search.py``), one trial each in a fresh process (vLLM patches
its process); quality is held-out perplexity within ``search.ppl_budget`` x the teacher's, speed is batch-1 decode
tokens/s at one thread, and ``search.min_prefill_speedup`` is a further floor on prefill (``admissible``). A vLLM
candidate is timed in a process of its own (``time_apart``), beside the uncompressed teacher in vLLM; every student
or sparse finalist is timed beside the dense teacher in its quantization and runtime (``timed_beside``). The winner
is a standard HF folder (compressed-tensors for int8 / int4) that vLLM and plain ``transformers`` load.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimray.compress.cpu import cpu_has_native_bf16
from slimray.compress.measure import torch_threads
from slimray.families.causal_lm.search import candidate_grid, candidate_key, measure_candidate, trial_advice
from slimray.families.causal_lm.report import lm_notes, report_extras
from slimray.families.recipe import Column, Quality, Recipe, StudentPlan
from slimray.runs import log
from slimray.storage import write_json_atomic

META = "slimray_lm.json"


@dataclass
class LMData:
    """What ``prepare`` reads once: the teacher's folder, the token windows, the teacher's argmax on the test windows
    (top-1 agreement), and a description of the split. Tensors only: it goes to the trials through the object store."""

    teacher_dir: str
    run_dir: str
    eval_windows: torch.Tensor
    val_windows: torch.Tensor
    train_windows: torch.Tensor | None
    teacher_argmax: torch.Tensor
    info: dict[str, Any]
    search: dict[str, Any]  # the search section (``build`` reads keep_float, the sparsity's dense layers, timing lengths)


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def _time_model(model: Any, *, runtime: str, search: Any) -> dict[str, float]:
    """Prefill and decode b1 / b8 tok/s of an HF model in ``runtime`` (one torch thread), or of a vLLM engine."""
    from slimray.families.causal_lm.evaluate import decode_tokens_per_s, prefill_tokens_per_s

    from slimray.families.causal_lm.vllm_engine import VllmModel

    if isinstance(model, VllmModel):  # an engine timed by its own API
        return model.time(prefill_len=search.prefill_len, num_new_tokens=search.num_new_tokens, num_repeats=search.num_repeats)
    with torch_threads(1):
        out = {"prefill_tokens_per_s": prefill_tokens_per_s(model, prompt_len=search.prefill_len, num_repeats=search.num_repeats)}
        for b in (1, 8):
            out[f"decode_tokens_per_s_b{b}"] = decode_tokens_per_s(model, runtime=runtime, batch_size=b, num_new_tokens=search.num_new_tokens,
                                                                   num_repeats=search.num_repeats)
    return out


class CausalLMRecipe(Recipe):
    quality = Quality(key="perplexity", label="perplexity", higher_is_better=False, budget="ratio")
    speed_key = "decode_tokens_per_s_b1"
    speed_label = "decode tok/s at batch 1 (1 thread)"
    fresh_trial_process = True  # a vLLM engine patches its process's torch threads: one trial per process
    identity = "none-hf_eager"  # the teacher as given: fp32, HF generate
    columns = (
        Column("perplexity", "perplexity", "{:.2f}"), Column("top1_agreement", "top-1 agr.", "{:.3f}"),
        Column("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"), Column("decode_tokens_per_s_b1", "decode b1 tok/s", "{:.1f}"),
        Column("decode_tokens_per_s_b8", "decode b8 tok/s", "{:.1f}"), Column("num_layers", "layers", "{}"),
        Column("size_bytes", "size MB", "mb"), Column("speedup", "decode b1 speedup", "x"),
    )

    def __init__(self) -> None:
        self._teacher: nn.Module | None = None
        self._run_dir: Path | None = None
        self._cut: dict[str, nn.Module] = {}  # pruned, untrained students by name (their initial weights)
        self._folders: dict[int, Path] = {}  # id(model) -> the folder it was loaded from or saved to (its bytes on disk)
        self._plans: dict[str, StudentPlan] = {}
        self._data: LMData | None = None
        self.importance: list[float] | None = None

    # data and teacher
    def check(self, cfg: Any) -> None:
        if cfg.teacher.source == "smollm2":
            from slimray.families.causal_lm.teacher import smollm2_gguf_path

            smollm2_gguf_path()  # the wheel is installed (else a ConfigError naming the pip command)
        if cfg.data.source == "wiki":
            from slimray.families.causal_lm.data import wiki_summaries_path

            wiki_summaries_path()

    def prepare(self, cfg: Any, run_dir: Path) -> LMData:
        """The teacher folder (GGUF converted once), the windows split by article, the teacher's argmax (cached)."""
        from safetensors.torch import load_file, save_file
        from transformers.utils import logging as hf_logging

        from slimray.families.causal_lm.data import load_jsonl_texts, load_wiki_summaries, pack_windows, split_documents
        from slimray.families.causal_lm.evaluate import argmax_predictions
        from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm

        hf_logging.disable_progress_bar()  # conversion / loading / saving bars: the console gets stage lines
        self._run_dir = run_dir
        if cfg.teacher.source == "smollm2":
            fresh = not (run_dir / "teacher" / "config.json").is_file()
            t0 = time.perf_counter()
            teacher_dir = ensure_smollm2_teacher(run_dir / "teacher")
            log(f"teacher: SmolLM2-135M-Instruct GGUF {'converted to fp32 safetensors' if fresh else 'reused'} in "
                f"{time.perf_counter() - t0:.0f}s -> {teacher_dir} (its weights were 4-bit: int4 would look nearly free)")
        else:
            teacher_dir = Path(cfg.teacher.path)
            log(f"teacher: {teacher_dir}")
        self._teacher, tokenizer = load_causal_lm(teacher_dir)
        self._folders[id(self._teacher)] = teacher_dir
        d, dist = cfg.data, cfg.distill
        docs = load_wiki_summaries() if d.source == "wiki" else load_jsonl_texts(d.path, text_field=d.text_field, group_field=d.group_field)
        split = split_documents(docs, seed=d.seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction)
        eval_windows = pack_windows(split["test"], tokenizer, window_len=d.window_len, num_windows=d.num_eval_windows)
        num_val = max(cfg.student.num_importance_windows, dist.num_val_windows)
        val_windows = pack_windows(split["val"], tokenizer, window_len=dist.seq_len, num_windows=num_val)
        train_windows = (pack_windows(split["train"], tokenizer, window_len=dist.seq_len, num_windows=dist.num_train_windows())
                         if cfg.student.depths else None)
        info = {"source": d.source, "documents": {k: len(v) for k, v in split.items()}, "split": f"by article, seed {d.seed}",
                "eval_windows": len(eval_windows), "window_len": d.window_len, "val_windows": len(val_windows),
                "train_windows": 0 if train_windows is None else len(train_windows), "train_window_len": dist.seq_len}
        log(f"data: {', '.join(f'{v} {k}' for k, v in info['documents'].items())} documents (split by article); {len(eval_windows)} "
            f"test windows of {d.window_len} tokens, {info['train_windows']} train / {len(val_windows)} val windows of {dist.seq_len}")
        argmax_file = run_dir / "cache" / "teacher_argmax.safetensors"
        if argmax_file.exists():
            argmax = load_file(str(argmax_file))["argmax"]
        else:
            with torch_threads(os.cpu_count() or 1):
                argmax = argmax_predictions(self._teacher, eval_windows)
            argmax_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = argmax_file.with_name(f".{argmax_file.name}.tmp.{os.getpid()}")
            save_file({"argmax": argmax.contiguous()}, str(tmp))
            os.replace(tmp, argmax_file)
        self._data = LMData(teacher_dir=str(teacher_dir), run_dir=str(run_dir), eval_windows=eval_windows, val_windows=val_windows,
                            train_windows=train_windows, teacher_argmax=argmax, info=info, search=cfg.search.model_dump())
        return self._data

    def teacher(self, cfg: Any, data: LMData) -> nn.Module:
        assert self._teacher is not None, "prepare runs first"
        return self._teacher

    def evaluate(self, cfg: Any, model: nn.Module, data: LMData) -> dict[str, Any]:
        """Held-out perplexity, top-1 agreement with the teacher, layers, parameters and bytes on disk."""
        from slimray.families.causal_lm.evaluate import dir_size_bytes, perplexity_and_agreement

        with torch_threads(os.cpu_count() or 1):
            ppl, agree = perplexity_and_agreement(model, data.eval_windows, reference_argmax=data.teacher_argmax)
        folder = self._folders.get(id(model))
        return {"perplexity": ppl, "top1_agreement": agree, "num_layers": int(model.config.num_hidden_layers),
                "params": int(sum(p.numel() for p in model.parameters())),
                "size_bytes": dir_size_bytes(folder) if folder is not None else None}

    # students
    def plan_students(self, cfg: Any, teacher: nn.Module, *, data: Any = None) -> list[StudentPlan]:
        """Layer importance (KL when skipped) on validation windows; each student keeps its most important layers, then
        fewer KV groups / MLP neurons when its width says so. The cut models are kept for ``init_state``."""
        from slimray.families.causal_lm.artifacts import load_meta
        from slimray.families.causal_lm.prune import drop_layers, layer_importance, prune_depth, prune_width

        st = cfg.student
        assert self._run_dir is not None
        n, inter = int(teacher.config.num_hidden_layers), int(teacher.config.intermediate_size)
        plans = st.plans(num_layers=n, intermediate_size=inter)
        if not plans:
            log("students: none configured (the search compresses the teacher only)")
            return []
        calib = self._val_windows[: st.num_importance_windows]
        imp_file = self._run_dir / "importance.json"
        if any(count < n for _, count, _ in plans):
            if imp_file.exists():
                self.importance = json.loads(imp_file.read_text())["importance"]
            else:
                with torch_threads(os.cpu_count() or 1):  # Ray's workers are idle now
                    self.importance = layer_importance(teacher, calib)
                write_json_atomic(imp_file, {"importance": self.importance, "windows": len(calib), "window_len": calib.shape[1],
                                             "what": "mean per-token KL(teacher || teacher without the layer), nats"})
        depth_cut: dict[int, tuple[list[int], nn.Module | None]] = {}  # one depth cut per count, shared by its widths
        uses = collections.Counter(count for _, count, _ in plans)
        to_train = {count for name, count, _ in plans if not self.is_saved(self._run_dir / "students" / name)}
        out = []
        for name, count, w in plans:
            folder = self._run_dir / "students" / name
            done = self.is_saved(folder)
            if count not in depth_cut:
                if count == n:
                    depth_cut[count] = (list(range(n)), None)
                elif st.iterative and count in to_train:
                    model = copy.deepcopy(teacher)
                    with torch_threads(os.cpu_count() or 1):
                        depth_cut[count] = (prune_depth(model, calib, num_layers_to_drop=n - count, iterative=True).kept, model)
                elif st.iterative:  # every student of this depth is distilled already: its layers are in its report
                    depth_cut[count] = (load_meta(folder).reports.get("distill", {}).get("kept_layers", []), None)
                else:
                    kept = sorted(sorted(range(n), key=lambda i: -self.importance[i])[:count])
                    depth_cut[count] = (kept, drop_layers(copy.deepcopy(teacher), keep=kept) if count in to_train else None)
            kept, cut = depth_cut[count]
            uses[count] -= 1
            width, hf_config = None, None
            if not done:
                base = cut if cut is not None else teacher
                model = base if base is cut and not uses[count] else copy.deepcopy(base)  # the last width takes the cut itself
                if not w.is_full():
                    width = prune_width(model, num_kv_heads=w.num_kv_heads, intermediate_size=w.neurons(inter),
                                        calibration=calib).model_dump(exclude={"kv_groups_kept"})
                self._cut[name] = model
                hf_config = model.config.to_dict()
            else:
                width = load_meta(folder).reports.get("distill", {}).get("width")
            if not uses[count]:
                depth_cut.pop(count)
            dropped = [i for i in range(n) if i not in kept]
            note = (f"keeps {count} of {n} layers" + (f" by importance (dropped {dropped})" if dropped else "")
                    + (f", width {width}" if width else ""))
            out.append(StudentPlan(name, {"num_layers": count, "kept_layers": kept, "width": width, "hf_config": hf_config}, note=note))
        self._plans = {p.name: p for p in out}
        return out

    def job_spec(self, plan: StudentPlan, data: LMData) -> dict[str, Any]:
        return {}  # the task builds the student from its HF config (``task.hf_config``)

    def init_state(self, cfg: Any, plan: StudentPlan, teacher: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._cut.pop(plan.name).state_dict().items()}

    def train_job(self, cfg: Any, plan: StudentPlan, *, distilled: bool) -> dict[str, Any]:
        from slimray.families.causal_lm.train import check_teacher_targets

        d = cfg.distill
        amp = d.mixed_precision == "bf16" or (d.mixed_precision == "auto" and cpu_has_native_bf16())
        task = {"hf_config": plan.spec["hf_config"], "temperature": d.temperature, "ce_weight": d.ce_weight,
                "warmup_steps": d.warmup_steps, "bf16_autocast": amp, "targets": d.targets}
        if d.targets == "teacher_in_loop":  # the folder, not the weights, goes to the workers; student layer i <- teacher layer kept[i]
            assert self._teacher is not None
            check_teacher_targets(plan.spec["hf_config"], self._teacher.config.to_dict(), hidden_weight=d.hidden_weight,
                                  layer_map=plan.spec["kept_layers"])
            task.update(teacher_path=str(Path(self._teacher_dir).resolve()), hidden_weight=d.hidden_weight,
                        layer_map=list(plan.spec["kept_layers"]))
        n = self._num_train_windows
        log(f"distil: {plan.name} on Ray Train, {d.num_workers} workers x batch {d.batch_size} x {d.seq_len} tokens, {d.epochs} epochs "
            f"x {-(-n // (d.batch_size * d.num_workers))} steps, lr {d.lr}, from "
            + ("the teacher in the loop" if d.targets == "teacher_in_loop" else f"the teacher's top-{d.top_k} logits")
            + (", bf16 autocast" if amp else ""))
        return {"epochs": d.epochs, "lr": d.lr, "weight_decay": d.weight_decay, "max_failures": d.max_failures, "task": task}

    def train_data(self, cfg: Any, data: LMData, teacher: nn.Module | None) -> dict[str, Any]:
        """The training windows with the teacher's top-k logits (cached in ``RUN/cache``), or alone when the teacher
        distils in the loop; the validation windows."""
        d = cfg.distill
        val = data.val_windows[: d.num_val_windows].numpy()
        if d.targets == "teacher_in_loop":
            log(f"distil: teacher in the loop (each worker loads {data.teacher_dir}), full-vocabulary KL"
                + (f" + {d.hidden_weight:g} x hidden-state MSE at the kept layers" if d.hidden_weight > 0 else ""))
            return {"windows": data.train_windows.numpy(), "val_windows": val}
        windows, values, indices = self._topk_cache(cfg, data, teacher)
        return {"windows": windows.numpy(), "topk_values": values.numpy(), "topk_indices": indices.numpy(), "val_windows": val}

    def _topk_cache(self, cfg: Any, data: LMData, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from slimray.families.causal_lm.kd import cache_teacher_topk, load_topk, save_topk

        k = cfg.distill.top_k
        path = Path(data.run_dir) / "cache" / "teacher_topk.safetensors"
        if path.exists():
            windows, values, indices = load_topk(path)
            log(f"distil: reusing the teacher's top-{k} cache ({len(windows)} windows)")
            return windows, values, indices
        t0 = time.perf_counter()
        windows = data.train_windows
        with torch_threads(os.cpu_count() or 1):
            values, indices = cache_teacher_topk(teacher, windows, k=k)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_topk(tmp, windows, values, indices)
        os.replace(tmp, path)
        log(f"distil: teacher top-{k} logits cached for {len(windows)} windows of {windows.shape[1]} tokens in "
            f"{time.perf_counter() - t0:.0f}s ({values.element_size() * k + indices.element_size() * k} bytes/token)")
        return windows, values, indices

    # compression search
    def candidates(self, cfg: Any) -> dict[str, dict[str, Any]]:
        """sparsity x quantization x runtime (keys ``[<sparsity>-]<quantization>-<runtime>``); a starting model's name
        prefixes them."""
        from slimray.families.causal_lm.report import searched_quant_methods

        s = cfg.search
        grid = candidate_grid(["m"], sparsities=s.sparsities, quant_methods=searched_quant_methods(cfg)[0], runtimes=s.runtimes,
                              compiled_quant_methods=s.compiled_quant_methods, sparse_quant_methods=s.sparse_quant_methods)
        return {key[2:]: {"quantization": q, "runtime": rt, "sparsity": sp} for key, (_, q, rt, sp) in grid.items()}

    def notes(self, cfg: Any) -> list[str]:
        return lm_notes(cfg)

    def trial_input(self, name: str, model: nn.Module, *, folder: Path | None, data: LMData) -> str:
        """The folder (a trial loads the model itself: no copy of the weights through the object store)."""
        return str(folder if folder is not None else data.teacher_dir)

    def measure_rows(self, cfg: Any, candidate: dict[str, Any], student: Any, data: LMData, *, out_dir: Path) -> list[dict[str, Any]]:
        s = cfg.search
        row = measure_candidate(model_dir=str(student), model_name="m", quant=candidate["quantization"], runtime=candidate["runtime"],
                                keep_float=list(s.keep_float), windows=data.eval_windows, reference_argmax=data.teacher_argmax,
                                search=s.model_dump(), tmp_root=Path(data.run_dir) / "trials" / ".tmp",
                                sparsity=candidate["sparsity"], sparsity_keep_dense=s.sparsity_keep_dense)
        return [{k: v for k, v in row.items() if k not in ("key", "status", "model", "model_dir")}]

    @staticmethod
    def _float(student: Any, data: LMData) -> tuple[nn.Module, Any]:
        """(a float copy of the starting model, its tokenizer): from its folder, or a copy of the module given."""
        from slimray.families.causal_lm.artifacts import load_lm

        if isinstance(student, (str, Path)):
            model, tok, _ = load_lm(student)
            return model, tok
        return copy.deepcopy(student), _tokenizer(data.teacher_dir)  # students keep the teacher's tokenizer

    def build(self, candidate: dict[str, Any], student: Any, data: LMData) -> Any:
        """The candidate as it runs: sparsified and quantized in torch, or (runtime vllm) stored as the winner would be
        and loaded by a vLLM engine (call it in a process of its own: ``time_apart``)."""
        from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, save_lm
        from slimray.families.causal_lm.quantize import quantize_lm
        from slimray.families.causal_lm.sparsity import sparsify_lm

        s = data.search
        q, rt, sp = candidate["quantization"], candidate["runtime"], candidate.get("sparsity", "none")
        model, tok = self._float(student, data)
        if rt == "vllm":
            from slimray.families.causal_lm.vllm_engine import VllmModel

            root = Path(data.run_dir) / "timing"
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=root)) / "model"
            save_lm(model, tok, folder, meta=LMArtifactMeta(quant_method=q, keep_float=s["keep_float"], runtime="vllm",
                                                           storage=compact_storage(q)))
            del model
            return VllmModel(folder, quant_method=q, num_threads=1,
                             max_model_len=max(s["prefill_len"], 16 + s["num_new_tokens"]) + 16)
        if sp != "none":
            model = sparsify_lm(model, sparsity=sp, keep_dense=s["sparsity_keep_dense"], inplace=True)
        return quantize_lm(model, method=q, keep_float=s["keep_float"], inplace=True)

    def time_apart(self, cfg: Any, settings: dict[str, Any]) -> bool:
        return settings.get("runtime") == "vllm"

    def timed_beside(self, cfg: Any, row: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The dense teacher in a student's (or a sparse candidate's) quantization and runtime; for a vLLM finalist, the
        uncompressed teacher in vLLM too (what the compression adds beyond the engine)."""
        out = {}
        q, rt = row["quantization"], row["runtime"]
        if row["student"] != "teacher" or row.get("sparsity", "none") != "none":
            out[candidate_key("teacher", q, rt)] = ("teacher", {"quantization": q, "runtime": rt, "sparsity": "none"})
        if rt == "vllm":
            out[candidate_key("teacher", "bf16", "vllm")] = ("teacher", {"quantization": "bf16", "runtime": "vllm", "sparsity": "none"})
        return out

    def budget(self, cfg: Any, *, teacher: dict[str, Any]) -> float:
        return float(cfg.search.ppl_budget)

    def admissible(self, cfg: Any, row: dict[str, Any], *, teacher: dict[str, Any]) -> bool:
        """``search.min_prefill_speedup`` x the teacher's prefill tok/s, when set (and the teacher's was measured)."""
        floor = cfg.search.min_prefill_speedup
        if floor is None or "prefill_tokens_per_s" not in teacher:
            return True
        return row["prefill_tokens_per_s"] >= floor * teacher["prefill_tokens_per_s"] - 1e-9

    def admissible_rule(self, cfg: Any) -> str | None:
        floor = cfg.search.min_prefill_speedup
        return None if floor is None else f"prefill at least {floor:g}x the teacher's (search.min_prefill_speedup)"

    def advice(self, error: str, candidate: dict[str, Any]) -> str:
        return trial_advice(error, quant=candidate["quantization"], runtime=candidate["runtime"])

    def time(self, models: dict[str, Any], data: LMData, *, cfg: Any,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
        """Prefill and batch-1 / batch-8 decode tok/s of each model in its runtime, one at a time, one thread."""
        return {k: _time_model(m, runtime=(settings or {}).get(k, {}).get("runtime", "hf_eager"), search=cfg.search)
                for k, m in models.items()}

    # artifacts
    def is_saved(self, path: Path) -> bool:
        return (path / META).exists()

    def save(self, path: Path, model: nn.Module, *, candidate: dict[str, Any], cfg: Any, data: LMData) -> None:
        """A distilled student: the float HF folder, with what made it in ``slimray_lm.json``."""
        from slimray.families.causal_lm.artifacts import LMArtifactMeta, save_lm
        from slimray.families.causal_lm.report import distill_settings

        d = cfg.distill
        plan = self._plans.get(path.name)
        report = {**({k: plan.spec[k] for k in ("num_layers", "kept_layers", "width")} if plan else {}), **distill_settings(d),
                  "steps_per_worker": d.epochs * -(-self._num_train_windows // (d.batch_size * d.num_workers))}
        save_lm(model, _tokenizer(data.teacher_dir), path, meta=LMArtifactMeta(reports={"distill": report}))
        self._folders[id(model)] = path

    def load(self, path: Path) -> nn.Module:
        from slimray.families.causal_lm.artifacts import load_lm

        model = load_lm(path)[0]
        self._folders[id(model)] = path
        return model

    def export(self, path: Path, model: Any, *, candidate: dict[str, Any], base: nn.Module, cfg: Any, data: LMData) -> None:
        """``RUN/winner``: the float starting model, sparsified as the candidate is, stored with its quantization
        (compressed-tensors for int8 / int4; vLLM and plain transformers load it); a sparse winner, whose packing only
        slimray reads, also gets ``RUN/export`` (the plain float folder)."""
        import shutil

        from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, export_hf, load_meta, save_lm
        from slimray.families.causal_lm.sparsity import sparsify_lm, sparsity_report

        s = cfg.search
        q, rt, sp = candidate["quantization"], candidate["runtime"], candidate.get("sparsity", "none")
        folder = self._folders.get(id(base))
        float_model, tok = self._float(base, data)
        if sp != "none":
            float_model = sparsify_lm(float_model, sparsity=sp, keep_dense=s.sparsity_keep_dense, inplace=True)
        reports = dict(load_meta(folder).reports) if folder is not None else {}
        plan = self._plans.get(folder.name) if folder is not None else None
        reports["search"] = {"candidate": candidate, "kept_layers": plan.spec["kept_layers"] if plan else
                             reports.get("distill", {}).get("kept_layers")}
        if sp != "none":
            reports["sparsity"] = sparsity_report(float_model, sparsity=sp, keep_dense=s.sparsity_keep_dense)
        meta = LMArtifactMeta(quant_method=q, keep_float=s.keep_float, runtime=rt, storage=compact_storage(q, sparsity=sp),
                              sparsity=sp, sparsity_keep_dense=s.sparsity_keep_dense, reports=reports)
        export = path.parent / "export"
        for p in (path, export):
            if p.exists():  # a rerun's search may choose again: replace whole folders
                shutil.rmtree(p)
        save_lm(float_model, tok, path, meta=meta)
        log(f"winner: {meta.storage} storage -> {path}")
        if sp != "none":
            export_hf(float_model, tok, export, dtype=torch.bfloat16 if q == "bf16" else torch.float32)
            log(f"the winner's sparse packing is slimray's own: plain HF float export -> {export}")
        shutil.rmtree(path.parent / "timing", ignore_errors=True)  # the vLLM timing folders

    def report_extras(self, cfg: Any, result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return report_extras(cfg, result, importance=self.importance, plans=getattr(self, "_plans", {}))

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def _teacher_dir(self) -> str:
        assert self._data is not None, "prepare runs first"
        return self._data.teacher_dir

    @property
    def _val_windows(self) -> torch.Tensor:
        assert self._data is not None, "prepare runs first"
        return self._data.val_windows

    @property
    def _num_train_windows(self) -> int:
        assert self._data is not None, "prepare runs first"
        return 0 if self._data.train_windows is None else len(self._data.train_windows)
