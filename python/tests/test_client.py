"""ferrotune.Client against a real server on loopback: upload, train (one short LoRA run),
wait with the progress bar, chat with the adapter through the server, OpenAI's client and the
local Engine."""

from __future__ import annotations

import json
import os

import pytest

import ferrotune
from conftest import MODEL

QUESTION = "What is 3 plus 4?"
ANSWER = "3 plus 4 is 7."


def arithmetic_rows():
    """The Rust tests' arithmetic dataset (tests/common/mod.rs)."""
    rows = []
    for i in range(1, 17):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append(
            {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
        )
    return rows


def test_errors_carry_the_servers_message_and_code(server, client, tmp_path):
    anonymous = ferrotune.Client(server.url)
    assert anonymous.health()["status"] == "ok"
    with pytest.raises(ferrotune.APIError) as e:
        anonymous.tasks()
    assert e.value.status == 401 and e.value.code and e.value.error

    with pytest.raises(ferrotune.APIError) as e:
        client.task("no-such-task")
    assert e.value.status == 404 and e.value.code == "not_found", e.value

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"nothing": 1}\n')
    with pytest.raises(ferrotune.APIError) as e:
        client.upload_dataset(bad)
    assert e.value.status == 422 and "line 2" in e.value.error, e.value

    with pytest.raises(ferrotune.APIError) as e:
        client.create_task(name="x", model_name=MODEL, dataset_id="nope", learning_rate=-1)
    assert e.value.status == 422 and "learning_rate" in e.value.error, e.value

    # /v1 answers OpenAI-shaped errors; their message and code come through too.
    with pytest.raises(ferrotune.APIError) as e:
        client.chat("no-such-model", QUESTION)
    assert e.value.status == 404 and "no-such-model" in e.value.error, e.value

    with pytest.raises(ferrotune.APIError) as e:
        ferrotune.Client("http://127.0.0.1:9").health()
    assert e.value.status == 0 and e.value.code == "unreachable"


def test_upload_train_wait_and_chat_with_the_adapter(server, client, models_dir, tmp_path, capsys):
    data = tmp_path / "arith.json"
    data.write_text(json.dumps(arithmetic_rows()))
    ds = client.upload_dataset(data)
    assert ds["format"] == "alpaca" and ds["num_rows"] == 16 and ds["filename"] == "arith.json"
    assert ds["file_id"] in [d["file_id"] for d in client.datasets()]

    # The same recipe as tests/chat.rs: 2 epochs of 16 rows in batches of 4 = 8 steps.
    spec = dict(
        model_name=MODEL, dataset_id=ds["file_id"], epochs=2, learning_rate=0.001,
        batch_size=4, cutoff_len=128, lora_rank=8, save_steps=100, logging_steps=1,
    )
    task = client.create_task(name="arith", **spec)
    # A second task waits behind the first (one running task per user): cancelling it is
    # immediate, and waiting for it raises.
    other = client.create_task(name="cancelled", **spec)
    moved = client.set_priority(other["task_id"], 7)
    assert moved["priority"] == 7 and moved["queue_position"] == 1, moved
    assert client.cancel(other["task_id"])["status"] == "cancelled"
    with pytest.raises(ferrotune.APIError) as e:
        client.set_priority(other["task_id"], 8)
    assert e.value.status == 409, e.value
    with pytest.raises(ferrotune.TaskFailedError, match="cancelled"):
        client.wait(other["task_id"], progress=False)
    assert client.wait(other["task_id"], progress=False, raise_on_failure=False)["status"] == (
        "cancelled"
    )

    capsys.readouterr()
    done = client.wait(task["task_id"], progress=True, timeout=900)
    bar = capsys.readouterr().err
    assert done["status"] == "completed", done
    assert "8/8" in bar and "completed" in bar, bar
    model_id = done["model_id"]

    listed = {t["task_id"]: t for t in client.tasks()}
    assert listed[task["task_id"]]["status"] == "completed"
    assert listed[other["task_id"]]["status"] == "cancelled"
    assert client.task(task["task_id"])["progress"]["current_step"] == 8
    points = client.metrics(task["task_id"])
    assert [p["step"] for p in points] == list(range(1, 9))
    assert points[-1]["loss"] < points[0]["loss"]

    # Through the server: the adapter learnt the dataset's answer; streaming says the same.
    assert client.chat(model_id, QUESTION, temperature=0, max_tokens=16) == ANSWER
    pieces = list(client.chat(model_id, QUESTION, temperature=0, max_tokens=16, stream=True))
    assert "".join(pieces) == ANSWER and len(pieces) > 3, pieces
    assert not client.chat(MODEL, QUESTION, temperature=0, max_tokens=6).startswith("3 plus 4")

    # Locally: the adapter, downloaded, answers the same through the in-process Engine.
    model = client.model(model_id)
    assert model["kind"] == "adapter" and model["base_model"] == MODEL
    assert not model["model_path"].startswith("/"), "paths are relative to the server's data"
    adapter = client.download_model(model_id, tmp_path / "adapter")
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    engine = ferrotune.Engine(models_dir)
    assert engine.chat(MODEL, QUESTION, adapter=adapter, temperature=0) == ANSWER

    # Export: the adapter merged into a Q8_0 GGUF, a model of its own that answers the same
    # through the server, and downloaded, locally.
    exp = client.export(model_id, "gguf", "q8_0", name="arith-q8")
    assert exp["status"] == "succeeded" and exp["report"]["retention"] > 0.95, exp
    assert exp["export_id"] in [e["export_id"] for e in client.exports()]
    assert client.chat(exp["model_id"], QUESTION, temperature=0, max_tokens=16) == ANSWER
    files = client.download_export(exp["export_id"], tmp_path / "gguf")
    assert sorted(os.path.basename(f) for f in files) == ["Modelfile", "arith-q8.Q8_0.gguf"]
    assert engine.chat(str(tmp_path / "gguf"), QUESTION, temperature=0) == ANSWER
    with pytest.raises(ferrotune.APIError) as refused:
        client.export(model_id, "safetensors", "q4_0")
    assert refused.value.status == 422

    # Judged: the adapter and its base on four of the rows, side by side.
    ev = client.evaluate(model_id, dataset_id=ds["file_id"], max_samples=4, max_new_tokens=24)
    cmp = ev["comparison"]
    before, after = cmp["baseline"]["metrics"], cmp["candidate"]["metrics"]
    assert after["samples"] == 4 and after["bleu_4"] > before["bleu_4"], cmp
    assert after["exact_match"] >= 50 and cmp["delta"]["bleu_4"] > 0, cmp
    assert [r["reference"] for r in cmp["rows"]] == [
        p["label"] for p in client.evaluation_predictions(ev["evaluation_id"])
    ]
    assert ev["evaluation_id"] in [e["evaluation_id"] for e in client.evaluations()]

    # Bring your own adapter: the folder uploaded again is another model that answers the same.
    mine = client.upload_adapter(adapter, name="uploaded")
    assert mine["kind"] == "adapter" and mine["base_model"] == MODEL and mine["name"] == "uploaded"
    assert client.chat(mine["model_id"], QUESTION, temperature=0, max_tokens=16) == ANSWER
    with pytest.raises(ferrotune.APIError) as refused:
        client.upload_adapter(data)
    assert refused.value.status == 422 and refused.value.code == "invalid_archive"

    # OpenAI's client pointed at the server.
    openai = pytest.importorskip("openai")
    oa = client.openai()
    assert isinstance(oa, openai.OpenAI)
    r = oa.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=16,
    )
    assert r.choices[0].message.content == ANSWER

    # Real log-probabilities through OpenAI's own client: per answer token (the greedy one is
    # the most likely), and for a scored prompt (lm-evaluation-harness's request).
    r = oa.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=8, logprobs=True, top_logprobs=2,
    )
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == r.usage.completion_tokens
    assert all(t.logprob <= 0 for t in tokens)
    assert tokens[0].top_logprobs[0].token == tokens[0].token
    scored = oa.completions.create(
        model=model_id, prompt="3 plus 4 is 7.", max_tokens=0, echo=True, logprobs=1,
    )
    lps = scored.choices[0].logprobs.token_logprobs
    assert scored.choices[0].text == "3 plus 4 is 7."
    assert lps[0] is None and len(lps) > 3 and all(x <= 0 for x in lps[1:])

    # Structured output through OpenAI's own client: the schema is enforced while decoding.
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": -1000, "maximum": 1000},
                       "unit": {"enum": ["apples", "none"]}},
        "required": ["answer", "unit"],
        "additionalProperties": False,
    }
    r = oa.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "sum", "schema": schema, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    parsed = json.loads(r.choices[0].message.content)
    assert set(parsed) == {"answer", "unit"} and isinstance(parsed["answer"], int)
    assert parsed["unit"] in ("apples", "none")

    # Tools through OpenAI's own client: a call comes back (forced with `required`; one call,
    # or the 135M model repeats it until `max_tokens`), and the conversation goes on with the
    # tool's result.
    tools = [{"type": "function", "function": {
        "name": "add", "description": "Adds two integers.",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": QUESTION}]
    r = oa.chat.completions.create(
        model=model_id, messages=messages, temperature=0, max_tokens=60, tools=tools,
        tool_choice="required", parallel_tool_calls=False,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "add" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])}]
    r = oa.chat.completions.create(
        model=model_id, messages=messages, temperature=0, max_tokens=16, tools=tools,
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
