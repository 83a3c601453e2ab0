"""The ``causal_lm`` family (issue #17): decoder language models such as SmolLM2-135M (Llama architecture).

Pure torch/transformers modules, none of which imports ray:
``teacher`` (packaged GGUF -> HF folder, loading a local folder), ``data`` (Wikipedia summaries split by article,
JSONL text, packed windows), ``evaluate`` (perplexity, agreement, prefill/decode speed, size, memory), ``prune``
(depth by measured layer importance, width by KV groups and MLP neurons), ``kd`` (token-level KL, cached top-k),
``runtime`` (HF generate and a compiled static-cache decode loop), ``quantize`` (int8 variants, bf16) and
``openai`` (OpenAI-compatible request models, sampling generator, response and SSE shapes).
"""
