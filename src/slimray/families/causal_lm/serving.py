"""The serving side of the causal_lm family (no ray): ``CausalLMCodec`` loads an artifact (``load_lm``: the HF
folder with the quantization its ``slimray_lm.json`` records), owns the continuous-batching ``BatchEngine`` and
the limits requests are checked against, and names its HTTP ingress — the OpenAI-compatible API in
``slimray.serving.openai_api`` (an import path, resolved by the one Serve builder, so this module loads no ray).

The tensor protocols of the other families (native ``/v1/<verb>``, KServe v1, Open Inference Protocol v2 over
REST or gRPC) do not apply to a text generator: their parse hooks answer a 4xx pointing at the OpenAI routes.
``forward(prompts)`` (the last position's logits of each prompt) is the health probe: finite logits = healthy.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from slimray.codec import Codec, RequestError
from slimray.families.causal_lm.engine import BatchEngine
from slimray.families.causal_lm.openai import Limits

OPENAI_ROUTES = "POST /v1/completions or POST /v1/chat/completions (OpenAI API)"


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model config's (one id or a list)."""
    ids: set[int] = set()
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


class CausalLMCodec(Codec):
    """A causal LM behind the OpenAI API: prompts in, generated text out (through the engine, not ``forward``)."""

    kind = "causal_lm"
    v1_verb = "completions"
    v1_hint = '{"model": "...", "prompt": "...", "max_tokens": 16}'
    input_name = "prompt"
    output_names = ("logits",)
    ingress: ClassVar[str] = "slimray.serving.openai_api:build_openai_api"

    def __init__(self, options: Any, loader: Any = None):
        super().__init__(options)
        from slimray.families.causal_lm.artifacts import load_lm

        self.device = torch.device("cpu")
        self.model, self.tokenizer, self.meta = (loader or load_lm)(options.model_dir)
        self.model.eval()
        cfg = self.model.config
        model_context = int(getattr(cfg, "max_position_embeddings", 0) or options.max_context_len or 2048)
        context = min(model_context, options.max_context_len) if options.max_context_len else model_context
        self.limits = Limits(context_len=context, max_tokens_limit=min(options.max_tokens_limit, context - 1),
                             default_max_tokens=min(options.default_max_tokens, options.max_tokens_limit))
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)
        self.engine = BatchEngine(self.model, self.tokenizer, eos_token_ids=self.eos_token_ids,
                                  max_num_seqs=options.max_num_seqs)

    # the probe / health path (the engine does the generation)
    def concat(self, parts: list[list[str]]) -> list[str]:
        return [p for part in parts for p in part]

    def probe(self) -> list[str]:
        return ["ready"]

    @torch.inference_mode()
    def forward(self, items: list[str]) -> dict[str, np.ndarray]:
        """The logits of each prompt's last position, float32 ``[N, V]`` (one forward per prompt, no cache)."""
        rows = []
        for text in items:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.eos_token_ids[0] if self.eos_token_ids else 0]
            rows.append(self.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].float())
        return {"logits": torch.stack(rows).numpy()}

    def _not_here(self, *_: Any) -> Any:
        raise RequestError(404, f"a {self.kind} model is served through the OpenAI API: {OPENAI_ROUTES}")

    parse_v1 = parse_instances = parse_v2 = _not_here

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [], "outputs": []}

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"kind": self.kind, "quantization": self.meta.quant_method, "runtime": self.meta.runtime,
                "engine": "continuous batching (one forward per decode step)", "context_len": self.limits.context_len,
                "max_tokens_limit": self.limits.max_tokens_limit, "default_max_tokens": self.limits.default_max_tokens,
                "max_num_seqs": self.engine.max_num_seqs, "num_layers": int(cfg.num_hidden_layers),
                "vocab_size": int(cfg.vocab_size), "chat_template": bool(getattr(self.tokenizer, "chat_template", None))}

    def stats(self) -> dict[str, Any]:
        return self.engine.info()
