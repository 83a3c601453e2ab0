"""Model kinds: what a served model takes and gives, one small codec per model family (the family registry,
``slimray.families``, names each family's codec; ``make_codec`` picks it from the artifact).

A codec loads the artifact, runs one forward pass on a batch, and translates between that batch and the
protocols' shapes of data. The protocols (``slimray.serving.protocols``) call only these methods, so a new
model family brings one codec class and a new protocol is one new module there:

* ``parse_v1(payload)`` (the native ``/v1/<verb>`` JSON body), ``parse_array(arr)`` (a binary body),
  ``parse_instances(list)`` (KServe v1 ``instances``), ``parse_v2(tensor, raw)`` (one Open Inference Protocol
  input tensor, JSON ``data`` or binary ``raw`` bytes) -> the request's *items*;
* ``forward(items)`` -> a dict of named numpy arrays, one row per item (runs off the event loop, batched);
* ``v1_answer(out)``, ``predictions(out)`` (KServe v1), ``v2_outputs`` / ``v2_metadata()`` -> answers;
* ``ingress`` names the HTTP ingress builder (default: the tensor protocols; the causal_lm family's codec,
  ``slimray.families.causal_lm.serving``, names the OpenAI-compatible API instead), ``stats()`` adds counters
  to the replica's info.

Every bad input raises ``RequestError`` (4xx with a message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimray.codec import (  # noqa: F401  (the tensor parsing every tensor codec shares lives in the core)
    FLOAT_TYPES, INT_TYPES, V2_DATATYPES, Codec, RequestError, decode_bytes_tensor, parse_array, parse_inputs, parse_v2_tensor,
    TensorCodec, v2_datatype,
)

# ----------------------------------------------------------------------------------------- classifier


class ClassifierCodec(TensorCodec):
    """Tensors in (the dataset's raw units; normalisation happens here), class probabilities and labels out."""

    kind = "classifier"
    v1_verb = "predict"
    v1_hint = '{"inputs": [...]}'
    input_name = "input"
    output_names = ("probabilities", "predictions")
    binary_bodies = True

    def __init__(self, options: Any, loader: Any = None):
        super().__init__(options)
        from slimray.families.classifier.artifacts import load_runnable, load_spec

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if loader is None:
            # the artifact's runtime: ONNX Runtime session (threads from the replica's options; CUDA provider
            # on a GPU replica), compiled module, or torch. CPU-only int8 kernels stay on the CPU.
            spec = load_spec(options.model_dir)
            cpu_only = spec.quantization.method in ("dynamic_int8", "static_int8") or spec.runtime.name == "onnxruntime"
            device = "cpu" if cpu_only else self.device.type
            self.model, self.spec = load_runnable(options.model_dir, num_threads=options.num_threads, device=device)
            if spec.runtime.name == "onnxruntime" or device == "cpu":
                self.device = torch.device("cpu")  # ONNX Runtime takes CPU tensors and moves them itself
        else:
            self.model, self.spec = loader(options.model_dir)
            if self.device.type == "cuda" and self.spec.quantization.method in ("none", "bf16", "fp16"):
                self.model = self.model.to(self.device)
            else:
                self.device = torch.device("cpu")
        self.model.eval()
        inp = self.spec.input
        # one number, or one per channel broadcast over the rest of an example (InputSpec.normalize, precomputed)
        per_channel = lambda v: torch.tensor(v, dtype=torch.float32).reshape(-1, *[1] * (len(inp.shape) - 1)) if isinstance(v, list) else float(v)  # noqa: E731
        self._mean, self._std = per_channel(inp.mean), per_channel(inp.std)
        self.num_classes = int(self.forward(self.probe())["probabilities"].shape[1])

    def probe(self) -> np.ndarray:
        return np.full((1, *self.spec.input.shape), self.spec.input.min_value, dtype=np.float32)

    def forward(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """One forward pass on raw-unit examples: probabilities float32 (N, C), predictions int64 (N,), -1 if non-finite."""
        x = ((torch.from_numpy(items) - self._mean) / self._std).to(self.device)
        with torch.inference_mode():
            logits = self.model(x).float().cpu()
        probs = torch.softmax(logits, dim=1).numpy()
        preds = probs.argmax(1).astype(np.int64)
        preds[~np.isfinite(probs).all(1)] = -1
        return {"probabilities": probs, "predictions": preds}

    def _limits(self) -> dict[str, Any]:
        inp = self.spec.input
        return dict(shape=inp.shape, min_value=inp.min_value, max_value=inp.max_value, max_examples=self.options.max_batch_examples)

    def v1_answer(self, out: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"predictions": out["predictions"].tolist(), "probabilities": out["probabilities"].tolist()}

    def predictions(self, out: dict[str, np.ndarray]) -> list[Any]:
        return out["predictions"].tolist()

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.spec.input.shape]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, self.num_classes]},
                {"name": "predictions", "datatype": "INT64", "shape": [-1]},
            ],
        }

    def describe(self) -> dict[str, Any]:
        runtime = getattr(getattr(self.spec, "runtime", None), "name", "torch")
        return {"kind": self.kind, "input_shape": self.spec.input.shape, "quantization": self.spec.quantization.method, "runtime": runtime}


# ----------------------------------------------------------------------------------------- sentence encoder


def check_texts(texts: Any, *, max_texts: int, max_chars: int, where: str = "texts") -> list[str]:
    """Validate a request's texts; raises ``RequestError`` (422 / 413) naming the first bad item."""
    if not isinstance(texts, list):
        raise RequestError(422, f"{where} must be a list of strings")
    if len(texts) == 0:
        raise RequestError(422, f"{where} is empty: send at least one text")
    if len(texts) > max_texts:
        raise RequestError(413, f"{len(texts)} texts is more than the allowed {max_texts} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RequestError(422, f"{where}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise RequestError(422, f"{where}[{i}] is empty or whitespace")
        if len(t) > max_chars:
            raise RequestError(422, f"{where}[{i}] has {len(t)} characters, more than the allowed {max_chars}")
    return list(texts)


class SentenceEncoderCodec(Codec):
    """Texts in (tokenised once per request, in the replica), normalised mean-pooled embeddings out."""

    kind = "sentence_encoder"
    v1_verb = "embed"
    v1_hint = '{"texts": ["...", ...]}'
    input_name = "text"
    output_names = ("embedding",)

    def __init__(self, options: Any, loader: Any = None):
        super().__init__(options)
        from slimray.families.sentence_encoder.models import load_text_artifact, load_tokenizer

        self.model, self.spec = (loader or load_text_artifact)(options.model_dir)
        self.model.eval()
        self.max_seq_len = int(self.spec.max_seq_len)
        self.tokenizer = load_tokenizer(Path(options.model_dir), max_seq_len=self.max_seq_len)
        self.forward(["warm-up batch of two", "texts of different lengths"])  # compiled models build their graphs now
        self.dim = int(self.forward(self.probe())["embedding"].shape[1])

    def concat(self, parts: list[list[str]]) -> list[str]:
        return [t for p in parts for t in p]

    def probe(self) -> list[str]:
        return ["ready"]

    def forward(self, items: list[str]) -> dict[str, np.ndarray]:
        """Tokenise once (truncated at ``max_seq_len``, padded to the longest), embed: embedding float32 (N, dim),
        truncated bool (N,)."""
        from slimray.families.sentence_encoder.models import encode_batch, pad_encodings

        encs = self.tokenizer.encode_batch(items)
        ids, mask = pad_encodings(encs, max_seq_len=self.max_seq_len)
        emb = encode_batch(self.model, ids, mask).numpy()
        return {"embedding": emb, "truncated": np.array([len(e.overflowing) > 0 for e in encs], dtype=bool)}

    def _texts(self, texts: Any, where: str) -> list[str]:
        return check_texts(texts, max_texts=self.options.max_batch_examples, max_chars=self.options.max_text_chars, where=where)

    def parse_v1(self, payload: Any) -> list[str]:
        if not isinstance(payload, dict) or set(payload) != {"texts"}:
            extra = sorted(set(payload) - {"texts"}) if isinstance(payload, dict) else []
            where = f"extra fields {extra} not allowed" if extra else "send an object with one field"
            raise RequestError(422, f"body: {where}: {self.v1_hint} (texts)")
        return self._texts(payload["texts"], "texts")

    def parse_instances(self, instances: list[Any]) -> list[str]:
        return self._texts(instances, "instances")

    def parse_v2(self, tensor: Any, raw: bytes | None) -> list[str]:
        if tensor.name != self.input_name:
            raise RequestError(422, f"unknown input {tensor.name!r}: this model has one input named {self.input_name!r}")
        if tensor.datatype.upper() != "BYTES":
            raise RequestError(422, f"datatype {tensor.datatype!r} is not supported: send BYTES (UTF-8 strings)")
        if raw is not None:
            try:
                data: Any = [b.decode("utf-8") for b in decode_bytes_tensor(raw)]
            except UnicodeDecodeError:
                raise RequestError(422, "BYTES elements must be UTF-8 text") from None
        elif tensor.data is None:
            raise RequestError(422, "input tensor has no data (send data, or binary_data_size with the binary extension)")
        else:
            data = tensor.data
            if len(data) and all(isinstance(d, list) and len(d) == 1 for d in data):
                data = [d[0] for d in data]  # [N, 1] sent nested
        if tensor.shape not in ([len(data)], [len(data), 1]):
            raise RequestError(422, f"shape {tensor.shape} does not match {len(data)} data items; use [N] or [N, 1]")
        return self._texts(data, "data")

    def v1_answer(self, out: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"dim": self.dim, "embeddings": out["embedding"].tolist(), "truncated": out["truncated"].tolist()}

    def predictions(self, out: dict[str, np.ndarray]) -> list[Any]:
        return out["embedding"].tolist()

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [{"name": self.input_name, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, self.dim]}],
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "max_seq_len": self.max_seq_len, "quantization": self.spec.quantization,
                "max_texts": self.options.max_batch_examples}


def artifact_kind(model_dir: str | Path) -> str:
    """The model family of the artifact in ``model_dir`` (its spec.json format; see ``slimray.families``)."""
    from slimray import families

    return families.for_artifact(model_dir).name


def make_codec(options: Any, loader: Any = None) -> Codec:
    """The codec of the artifact's model family (``options.kind`` names the family when given)."""
    from slimray import families

    kind = options.kind or artifact_kind(options.model_dir)
    if kind not in families.names():
        raise ValueError(f"unknown model kind {kind!r}; known: {families.names()}")
    return families.get(kind).load("codec")(options, loader)
