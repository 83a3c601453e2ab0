"""The continuous-batching engine without any server: concurrent greedy requests give exactly what each gives
alone (the one-request generator on a static-cache session), they share decode steps, each keeps its own
sampling settings and stop strings, ``max_num_seqs`` caps a step, and an abandoned request leaves the batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from slimray.families.causal_lm import openai as oa
from slimray.families.causal_lm.engine import BatchEngine
from slimray.families.causal_lm.runtime import make_session

LIMITS = oa.Limits(context_len=128, max_tokens_limit=64)
PROMPTS = ["The cat", "Rivers flow from the mountains to", "A computer program is a sequence of instructions", "Bees",
           "Paris is the capital of France and a centre of art and science. The history of"]


def _prepared(tok, prompt: str, **kw):
    return oa.prepare(oa.parse_request("completion", {"prompt": prompt, **kw}), tok, limits=LIMITS)


def _solo(model, tok, prepared, eos) -> tuple[str, int, str]:
    text, n, finish = "", 0, None
    for d in oa.generate(make_session(model, "static", max_cache_len=LIMITS.context_len), prepared, tok, eos_token_ids=eos):
        text, n, finish = text + d.text, n + 1, d.finish_reason
    return text, n, finish


async def _collect(engine: BatchEngine, prepared) -> tuple[str, int, str]:
    text, n, finish = "", 0, None
    async for d in engine.generate(prepared):
        text, n, finish = text + d.text, n + 1, d.finish_reason
    return text, n, finish


def _run_all(engine, prepared_list):
    async def main():
        return await asyncio.gather(*(_collect(engine, p) for p in prepared_list))

    try:
        return asyncio.run(main())
    finally:
        engine.close()


def test_concurrent_greedy_equals_solo_and_shares_steps(tiny_model, tiny_tokenizer):
    eos = [tiny_tokenizer.eos_token_id]
    requests = [_prepared(tiny_tokenizer, p, max_tokens=12 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    engine = BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=eos, max_num_seqs=8)
    together = _run_all(engine, requests)
    alone = [_solo(tiny_model, tiny_tokenizer, p, eos) for p in requests]
    assert together == alone
    stats = engine.info()
    assert stats["largest_step_batch"] == len(PROMPTS)  # all were queued before the first step
    assert stats["num_prefills"] == len(PROMPTS) and stats["num_finished"] == len(PROMPTS)
    assert stats["num_prefill_forwards"] < len(PROMPTS)  # newcomers of one step are prefilled together
    assert stats["num_generated_tokens"] == sum(n for _, n, _ in alone)
    assert stats["num_active"] == 0 and stats["num_waiting"] == 0


def test_each_request_keeps_its_sampling_and_stops(tiny_model, tiny_tokenizer):
    eos = [tiny_tokenizer.eos_token_id]
    greedy = _solo(tiny_model, tiny_tokenizer, _prepared(tiny_tokenizer, "The cat", max_tokens=16, temperature=0), [])[0]
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    requests = [
        _prepared(tiny_tokenizer, "The cat", max_tokens=16, temperature=0, stop=[stop]),
        _prepared(tiny_tokenizer, "Rivers", max_tokens=10, temperature=1.0, top_p=0.9, seed=3),
        _prepared(tiny_tokenizer, "Rivers", max_tokens=10, temperature=0.7, seed=4),
        _prepared(tiny_tokenizer, "Bees collect", max_tokens=8, temperature=0),
    ]
    engine = BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=eos, max_num_seqs=4)
    together = _run_all(engine, requests)
    assert together == [_solo(tiny_model, tiny_tokenizer, p, eos) for p in requests]
    assert together[0][0] == greedy[: greedy.index(stop)] and together[0][2] == "stop"


def test_max_num_seqs_caps_a_step(tiny_model, tiny_tokenizer):
    eos = [tiny_tokenizer.eos_token_id]
    requests = [_prepared(tiny_tokenizer, p, max_tokens=6, temperature=0) for p in PROMPTS]
    engine = BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=eos, max_num_seqs=2)
    together = _run_all(engine, requests)
    assert together == [_solo(tiny_model, tiny_tokenizer, p, eos) for p in requests]
    assert engine.info()["largest_step_batch"] == 2


def test_abandoned_request_leaves_the_batch(tiny_model, tiny_tokenizer):
    client_left = threading.Event()

    def hold_after_two_steps(n: int) -> None:  # on the engine thread, after a step's forward, before its deltas go out
        if engine.stats.num_steps >= 2:  # the long request has had its 2 tokens: it is still running when its client leaves
            assert client_left.wait(30), "the client never left"

    engine = BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=[], max_num_seqs=4, on_step=hold_after_two_steps)
    long = oa.prepare(oa.parse_request("completion", {"prompt": "The cat", "max_tokens": 240, "temperature": 0}), tiny_tokenizer,
                      limits=oa.Limits(context_len=256, max_tokens_limit=240))
    short = _prepared(tiny_tokenizer, "Rivers", max_tokens=20, temperature=0)

    async def main():
        async def first_two():
            got, gen = [], engine.generate(long)
            async for d in gen:
                got.append(d)
                if len(got) == 2:
                    break
            await gen.aclose()  # the client goes away (what a cancelled streaming response does)
            client_left.set()
            return got

        return await asyncio.gather(first_two(), _collect(engine, short))

    try:
        partial, (_, n, finish) = asyncio.run(main())
    finally:
        engine.close()
    assert len(partial) == 2 and n == 20 and finish == "length"
    stats = engine.info()
    assert stats["num_cancelled"] == 1 and stats["num_active"] == 0 and stats["num_finished"] == 1
    assert stats["num_generated_tokens"] < 240 + 20  # the abandoned one stopped early


def test_engine_rejects_bad_settings(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_num_seqs"):
        BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=[], max_num_seqs=0)


def test_requests_finishing_at_prefill_never_join(tiny_model, tiny_tokenizer):
    eos = [tiny_tokenizer.eos_token_id]
    requests = [_prepared(tiny_tokenizer, p, max_tokens=1 if i % 2 else 7, temperature=0) for i, p in enumerate(PROMPTS)]
    engine = BatchEngine(tiny_model, tiny_tokenizer, eos_token_ids=eos, max_num_seqs=8)
    together = _run_all(engine, requests)
    assert together == [_solo(tiny_model, tiny_tokenizer, p, eos) for p in requests]
    assert [n for _, n, _ in together][1::2] == [1, 1] and engine.info()["largest_step_batch"] <= 3
