"""The smollm-tiny recipe end to end on the real SmolLM2 teacher (GGUF converted into the run folder): data split
by article, teacher evaluation, a depth-pruned student distilled on Ray Train (2 workers), {teacher, student} x
{none, token_int8} on Ray Tune, side-by-side timing, the winner saved as a standard HF folder
(compressed-tensors for int8) that ``transformers`` loads with no slimray code and that gives the winner's logits, the report, and the winner
served on Ray Serve behind the OpenAI API (what ``slimray run`` does after the report)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.long]  # a few minutes on 2 cores (GGUF conversion, Ray Train, Tune)


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    from slimray.families.causal_lm.config import load_lm_config
    from slimray.pipelines import run_pipeline

    cfg = load_lm_config(recipe="smollm-tiny")
    out = tmp_path_factory.mktemp("lm-runs")
    report = run_pipeline(cfg, out_dir=out, fresh=True)
    return report, out / cfg.name


def test_report(tiny_run):
    report, run = tiny_run
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["winner"]["key"] == report["winner"]["key"]
    assert (run / "report.md").read_text().startswith("# smollm-tiny") and (run / "pareto.png").stat().st_size > 0
    assert len(report["trials"]) == 4 and all(t["status"] == "ok" for t in report["trials"]), report["trials"]
    t = report["teacher"]
    assert t["top1_agreement"] == 1.0 and t["num_layers"] == 30 and t["size_bytes"] > 5e8
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8"):
        assert t[key] > 0 and report["winner"][key] > 0
    assert set(report["targets"]) == {"decode_b1_speedup", "prefill_speedup", "perplexity_ratio", "size_ratio", "wall_time_s"}
    (student,) = report["lm_students"]
    assert student["num_layers"] == 2 and len(student["kept_layers"]) == 2 and len(report["importance"]) == 30
    assert [m["epoch"] for m in report["distill_metrics"][student["name"]]] == [1, 2]  # Ray Train: one checkpoint per epoch
    assert report["data"]["documents"]["test"] > 0 and report["data"]["eval_windows"] == 2
    teacher_rows = [r for r in report["trials"] if r["student"] == "teacher" and r["quantization"] == "none"]
    assert teacher_rows[0]["perplexity"] == pytest.approx(t["perplexity"], rel=1e-4)


def test_winner_loads_in_plain_transformers(tiny_run):
    """The winner folder itself is a standard HF folder (compressed-tensors for an int8 winner): plain transformers
    loads it with no slimray code and gives slimray's winner logits (up to how each rounds activations)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimray import families
    from slimray.families.causal_lm.artifacts import load_lm

    report, run = tiny_run
    assert families.for_artifact(run / "winner").name == "causal_lm"
    winner, tok, meta = load_lm(run / "winner")
    assert meta.quant_method == report["winner"]["quantization"]
    assert not (run / "export").exists()  # only a sparse winner needs a float export
    plain = AutoModelForCausalLM.from_pretrained(run / "winner").eval()
    text = ("Paris is the capital of France and a centre of art, fashion and science. Bees collect nectar from flowers "
            "and turn it into honey, which they store in wax combs for the winter.")
    ids = AutoTokenizer.from_pretrained(run / "winner")(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        got, want = winner(ids).logits.float(), plain(ids).logits.float()
    if meta.quant_method in ("none", "bf16"):
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (got - want).abs().max()
    else:  # the same stored weights; the engines round activations differently and slimray quantizes lm_head at
        # load (transformers keeps it float): they score held-out text alike (SmolLM2 teacher int8 / int4: within 1%;
        # smollm-tiny's winner once 3.1%, 2.62 vs 2.71)
        nll = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (got, want)]
        assert abs(nll[0] - nll[1]) < 0.06 * nll[1], nll
    assert report["winner_reloaded"]["perplexity"] == pytest.approx(report["winner"]["perplexity"], rel=1e-3)


def test_the_winner_is_served_behind_the_openai_api(tiny_run, capsys):
    """The run's winner deployed as ``slimray run`` deploys it (``options_for_run`` from the run's config): the
    post-deploy check gets the in-process greedy text, and the official ``openai`` client streams a chat."""
    from openai import OpenAI
    from ray import serve

    from slimray.serving.app import build_app, deploy, undeploy
    from slimray.serving.checks import check_causal_lm
    from slimray.serving.options import options_for_run
    from tests.serving.conftest import free_port

    report, run = tiny_run
    options = options_for_run(run, num_cpus_per_replica=0.5)
    url = deploy(build_app(options), name="smollm-tiny", port=free_port())
    try:
        check_causal_lm(url, run, options)
        assert "in-process" in (out := capsys.readouterr().out) and ": same" in out, out
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [options.name]
        chunks = list(client.chat.completions.create(model=options.name, messages=[{"role": "user", "content": "Name a river."}],
                                                     max_tokens=6, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        undeploy("smollm-tiny")
        serve.shutdown()  # this module started Serve on its own port; later test packages start their own
