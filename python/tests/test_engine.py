"""ferrotune.Engine: local chat on SmolLM2-135M-Instruct through the extension module."""

from __future__ import annotations

import threading
import time

import pytest

import ferrotune
from conftest import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_base_models(engine, models_dir):
    assert MODEL in engine.models()
    assert engine.models_dir == models_dir
    assert ferrotune.Engine(models_dir / "missing").models() == []


def test_greedy_answer(engine):
    assert engine.chat(MODEL, FRANCE, temperature=0, max_tokens=32) == (
        "The capital of France is Paris."
    )
    # A string is one user message; a (role, content) pair is a message too.
    assert engine.chat(MODEL, "What is the capital of France?", temperature=0) == (
        "The capital of France is Paris."
    )
    assert engine.chat(MODEL, [("user", "What is the capital of France?")], temperature=0) == (
        "The capital of France is Paris."
    )


def test_streaming_gives_the_same_text_in_pieces(engine):
    whole = engine.chat(MODEL, "Write a poem about the sea.", temperature=0, max_tokens=24)
    stream = engine.chat(
        MODEL, "Write a poem about the sea.", temperature=0, max_tokens=24, stream=True
    )
    assert isinstance(stream, ferrotune.ChatStream)
    assert stream.finish_reason is None and stream.usage is None
    pieces = list(stream)
    assert len(pieces) > 5, pieces
    assert "".join(pieces) == whole
    assert stream.finish_reason == "length"
    usage = stream.usage
    assert usage["completion_tokens"] == 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + 24 and usage["prompt_tokens"] > 5
    assert next(stream, None) is None

    greedy = engine.chat(MODEL, FRANCE, temperature=0, stream=True)
    assert "".join(greedy) == "The capital of France is Paris."
    assert greedy.finish_reason == "stop"


def test_stop_strings_end_the_answer_before_them(engine):
    answer = engine.chat(MODEL, FRANCE, temperature=0, stop=" is")
    assert answer == "The capital of France"
    assert engine.chat(MODEL, FRANCE, temperature=0, stop=["Paris", "xyz"]) == (
        "The capital of France is "
    )


def test_the_same_seed_gives_the_same_text(engine):
    def sample(seed):
        return engine.chat(
            MODEL, "Tell me a story.", temperature=0.9, top_p=0.95, max_tokens=20, seed=seed
        )

    first = sample(7)
    assert len(first) > 20
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10)), "other seeds sample other text"


def test_close_stops_a_stream(engine):
    stream = engine.chat(MODEL, "Write a long story.", temperature=0, max_tokens=200, stream=True)
    first = next(stream)
    assert first
    stream.close()
    assert list(stream) == []
    assert stream.finish_reason is None


def test_the_gil_is_released_while_generating(engine):
    engine.chat(MODEL, "Hi", temperature=0, max_tokens=1)  # the weights are loaded
    done = threading.Event()
    result = {}

    def generate():
        result["text"] = engine.chat(
            MODEL, "Write a poem about the sea.", temperature=0, max_tokens=32
        )
        done.set()

    t = threading.Thread(target=generate)
    started = time.monotonic()
    t.start()
    ticks = 0
    while not done.is_set():
        time.sleep(0.002)  # waking up needs the GIL
        ticks += 1
    elapsed = time.monotonic() - started
    t.join()
    assert result["text"]
    # With the GIL held through the generation this thread could not wake up until the end;
    # released, it ticks all along (a quarter of the ideal count allows for a busy machine).
    assert ticks > 0.25 * elapsed / 0.002, (ticks, elapsed)


def test_errors_are_exceptions_with_clear_messages(engine, tmp_path):
    with pytest.raises(ferrotune.ModelNotFoundError, match="no base model `nope`"):
        engine.chat("nope", FRANCE)
    with pytest.raises(LookupError):
        engine.chat("nope", FRANCE)

    with pytest.raises(ferrotune.InvalidRequestError, match=r'messages\[0\] has no "content"'):
        engine.chat(MODEL, [{"role": "user"}])
    with pytest.raises(ferrotune.InvalidRequestError, match=r'messages\[1\] has role "robot"'):
        engine.chat(MODEL, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])
    with pytest.raises(ferrotune.InvalidRequestError, match=r'messages\[0\]\["content"\] must'):
        engine.chat(MODEL, [{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="messages is empty"):
        engine.chat(MODEL, [])
    with pytest.raises(TypeError, match="messages must be a list"):
        engine.chat(MODEL, 42)
    with pytest.raises(TypeError, match="not one dict"):
        engine.chat(MODEL, {"role": "user", "content": "hi"})

    with pytest.raises(ferrotune.InvalidRequestError, match="temperature must be between"):
        engine.chat(MODEL, FRANCE, temperature=-1)
    with pytest.raises(ferrotune.InvalidRequestError, match="top_p"):
        engine.chat(MODEL, FRANCE, top_p=0)
    with pytest.raises(ferrotune.InvalidRequestError, match="max_tokens"):
        engine.chat(MODEL, FRANCE, max_tokens=0)

    with pytest.raises(ferrotune.InvalidRequestError, match="no adapter folder at"):
        engine.chat(MODEL, FRANCE, adapter=tmp_path / "missing")
    with pytest.raises(ferrotune.InvalidRequestError, match="adapter"):
        engine.chat(MODEL, FRANCE, adapter=tmp_path)  # a folder without an adapter in it
    assert isinstance(ferrotune.InvalidRequestError("x"), ferrotune.FerrotuneError)


def test_the_kv_cache_type_is_chosen_and_checked(engine, models_dir):
    assert engine.kv_cache_dtype == "f16"
    # A 32-bit KV cache: the same greedy answer as the default half-float one.
    full = ferrotune.Engine(models_dir, kv_cache_dtype="F32")
    assert full.kv_cache_dtype == "f32"
    assert full.chat(MODEL, FRANCE, temperature=0, max_tokens=32) == (
        "The capital of France is Paris."
    )
    with pytest.raises(ValueError, match="kv_cache_dtype: unknown KV-cache type"):
        ferrotune.Engine(models_dir, kv_cache_dtype="q8_0")
