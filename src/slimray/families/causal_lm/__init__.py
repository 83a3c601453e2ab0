"""The ``causal_lm`` family (issue #17): decoder language models such as SmolLM2-135M (Llama architecture).

Pure torch/transformers modules, none of which imports ray:
``teacher`` (packaged GGUF -> HF folder, loading a local folder), ``data`` (Wikipedia summaries split by article,
JSONL text, packed windows), ``evaluate`` (perplexity, agreement, prefill/decode speed, size, memory), ``prune``
(depth by measured layer importance, width by KV groups and MLP neurons), ``kd`` (token-level KL, cached top-k),
``runtime`` (HF generate and a compiled static-cache decode loop), ``quantize`` (int8 variants, int4, bf16; fp8 and
torchao int4 for a model on CUDA), ``sparsity`` (2:4 and unstructured magnitude pruning, packed storage, the CUDA
2:4 swap), ``artifacts`` (HF folders + ``slimray_lm.json``; int8 / int4 in compressed-tensors, sparse packing, plain HF export), ``config`` (the pipeline's
strict config and the ``smollm`` / ``smollm-tiny`` recipes) and ``openai`` (OpenAI-compatible request models,
sampling generator, response and SSE shapes). ``recipe`` gives the shared pipeline (``slimray.pipelines.flow``) its
hooks, ``search`` the candidate grid and how one candidate is measured, ``report`` the family's report sections.

Entry points the family plug-in wires (all keyword arguments beyond the first one or two):
- teacher: ``ensure_smollm2_teacher(out_dir) -> Path``, ``convert_gguf(gguf_path, out_dir)``,
  ``check_causal_lm_folder(path) -> dict``, ``load_causal_lm(path, *, dtype) -> (model, tokenizer)``
- data: ``load_wiki_summaries()``, ``load_jsonl_texts(path, *, text_field, group_field)``,
  ``split_documents(docs, *, seed, val_fraction, test_fraction) -> {"train","val","test"}``,
  ``pack_windows(docs, tokenizer, *, window_len, num_windows) -> LongTensor [N, L]``
- prune: ``prune_depth(model, windows, *, num_layers_to_drop, iterative) -> DepthPruneReport``,
  ``prune_width(model, *, num_kv_heads, intermediate_size, calibration) -> WidthPruneReport``
- kd: ``distill(student, windows, *, config: KDConfig, teacher= | topk=, layer_map, on_step) -> list[KDStep]``,
  ``kl_loss``, ``topk_kl_loss``, ``hidden_loss``, ``cache_teacher_topk``
- quantize: ``quantize_lm(model, *, method, keep_float) -> model``, ``gpu_quant_config(method)``
- sparsity: ``sparsify_lm(model, *, sparsity, keep_dense) -> model``, ``sparsity_report``, ``pack_2_4`` /
  ``unpack_2_4``, ``pack_unstructured`` / ``unpack_unstructured``, ``to_semi_structured_gpu(model)``
- runtime: ``make_session(model, runtime, *, max_cache_len, batch_size)`` (``prefill``/``step``), ``greedy_decode``,
  ``hf_generate``
- evaluate: ``evaluate_lm(model, windows, *, teacher, runtime, folder, ...) -> LMEvaluation`` and its parts
- artifacts: ``save_lm(model, tokenizer, out_dir, *, meta)`` (``meta.storage``: float, int8 / int4 in compressed-tensors via
  ``ctformat``, sparse, sparse_int8), ``load_lm(path) ->
  (model, tokenizer, meta)``, ``export_hf(model, tokenizer, out_dir, *, dtype)``
- openai: ``parse_request(kind, body)``, ``prepare(request, tokenizer, *, limits)``, ``complete(...)``,
  ``stream(...)``, ``models_body(ids)``, ``RequestError.status/.body()``
"""
