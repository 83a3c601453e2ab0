"""A failed trial explained in one line (exception, layer/operator, what to change); a sweep that mostly failed
says so and names the settings that ran; a failed memory probe names the child's exception."""

from __future__ import annotations

import pytest

from slimray.compress.memprobe import failure_cause
from slimray.families.classifier.explain import explain, most_failed


def _raise(err: Exception) -> Exception:
    try:
        raise err
    except Exception as caught:
        return caught


def test_an_onnx_operator_failure_names_the_operator_and_the_runtime_to_drop():
    err = _raise(RuntimeError("Exporting the operator 'aten::_transformer_encoder_layer_fwd' to ONNX opset version 17 is not supported"))
    why = explain(err, stage="export", ratio=0.0, method="none", runtime="onnxruntime")
    assert why["where"] == "operator aten::_transformer_encoder_layer_fwd"
    assert "onnxruntime" in why["advice"] and "search.space.runtimes" in why["advice"]
    assert "\n" not in why["line"] and why["line"].startswith("prune 0 none@onnxruntime failed at export: RuntimeError:")


def test_a_head_width_failure_points_at_the_prune_ratio():
    why = explain(_raise(AssertionError("embed_dim 33 not divisible by num_heads 4")), stage="prune", ratio=0.25, method="none", runtime="torch")
    assert "0.25" in why["advice"] and "prune_ratios" in why["advice"] and why["error"].startswith("AssertionError:")


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown trial stage"):
        explain(RuntimeError("x"), stage="lunch", ratio=0.0, method="none", runtime="torch")


def test_most_failed_names_the_settings_that_ran():
    ok = {"status": "ok", "prune_ratio": 0.0, "quantization": "none", "runtime": "torch"}
    bad = [{"status": "error", "stage": "export", "prune_ratio": r, "quantization": "none", "runtime": "onnxruntime"} for r in (0.0, 0.25)]
    assert most_failed([ok, *bad[:1]]) is None  # half is not most
    line = most_failed([ok, *bad])
    assert line.startswith("2 of 3 sweep trials failed (2 at export)") and "runtimes ['torch']" in line and "prune_ratios [0.0]" in line
    assert "none ran" in most_failed(bad)


def test_memory_probe_failure_shows_the_childs_exception():
    stderr = ('Traceback (most recent call last):\n  File "/x/transformer.py", line 901, in <genexpr>\n'
              "    (x.device.type in t) for x in args\nAttributeError: 'function' object has no attribute 'device'\n")
    cause = failure_cause(stderr, 1)
    assert cause.startswith("AttributeError: 'function' object has no attribute 'device'") and "transformer.py" in cause
    assert failure_cause("", -9) == "killed by signal 9, no exception printed"
