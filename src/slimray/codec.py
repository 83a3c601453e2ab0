"""What a model family gives serving: the ``Codec`` contract (load an artifact, run a batch, translate between
the batch and the protocols' data) and ``RequestError``, the 4xx with a message every bad input raises.

It lives below both sides: a family's codec (``slimray.families.causal_lm.serving``) subclasses ``Codec`` without
importing serving, and serving (``slimray.serving.codecs`` for the classifier and the sentence encoder,
``protocols``, ``http``) calls it through the family registry. The methods are described in
``slimray.serving.codecs``. Core: numpy only, no ray, no family.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Codec:
    """Base class: one served model of one kind. Subclasses set ``kind``, ``v1_verb`` and the methods below."""

    kind: ClassVar[str]
    v1_verb: ClassVar[str]  # the native route is POST /v1/<verb>
    v1_hint: ClassVar[str]  # what the native body looks like, for error messages
    input_name: ClassVar[str]
    output_names: ClassVar[tuple[str, ...]]  # the V2 outputs, in their default order
    binary_bodies: ClassVar[bool] = False  # whether the native route takes raw float32 / .npy bodies (parse_array)
    #: the family's HTTP ingress, ``"module:function"`` with ``build_api``'s signature ``(server, *, api_key, metrics)``;
    #: the default is the tensor protocols (``slimray.serving.protocols:build_api``); a text generator names its own
    ingress: ClassVar[str] = "slimray.serving.protocols:build_api"

    def __init__(self, options: Any, loader: Any = None):
        self.options = options

    # items are np.ndarray (N, ...) or list[str]: both have len() and slice
    def concat(self, parts: list[Any]) -> Any:
        raise NotImplementedError

    def forward(self, items: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def probe(self) -> Any:
        raise NotImplementedError

    def healthy(self, out: dict[str, np.ndarray]) -> bool:
        return all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f")

    def parse_v1(self, payload: Any) -> Any:
        raise NotImplementedError

    def parse_array(self, arr: np.ndarray) -> Any:
        raise RequestError(415, f"a {self.kind} takes JSON bodies only: send {self.v1_hint}")

    def parse_instances(self, instances: list[Any]) -> Any:
        raise NotImplementedError

    def parse_v2(self, tensor: Any, raw: bytes | None) -> Any:
        raise NotImplementedError

    def v1_answer(self, out: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def predictions(self, out: dict[str, np.ndarray]) -> list[Any]:
        raise NotImplementedError

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counters of the codec's own machinery (e.g. a decode engine), merged into the replica's info."""
        return {}

    def _check_count(self, n: int, what: str = "examples") -> None:
        if n == 0:
            raise RequestError(422, f"inputs is empty: send at least one of the {what}")
        if n > self.options.max_batch_examples:
            raise RequestError(413, f"batch of {n} {what} is larger than the allowed {self.options.max_batch_examples}")
