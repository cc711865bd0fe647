"""OpenAI's fine-tuning API against a real server, driven by the official `openai` client
unchanged: the script a user wrote for OpenAI (upload a file, create a job, poll it, read its
events and checkpoints, chat with `fine_tuned_model`) with only `base_url` and `api_key`
changed; and the job is the same task the web UI and ferrotune's own API show."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MODEL
from test_client import ANSWER, QUESTION, arithmetic_rows

openai = pytest.importorskip("openai")


def chat_rows():
    return [
        {"messages": [{"role": "user", "content": r["instruction"]},
                      {"role": "assistant", "content": r["output"]}]}
        for r in arithmetic_rows()
    ]


def dpo_rows():
    return [
        {"input": {"messages": [{"role": "user", "content": r["instruction"]}]},
         "preferred_output": [{"role": "assistant", "content": r["output"]}],
         "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]}
        for r in arithmetic_rows()
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_openai_fine_tuning_script_runs_unchanged(server, client, tmp_path):
    key = client.create_api_key("fine-tuning script")["key"]
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=key)

    # --- the script, as written for OpenAI -------------------------------------------------
    with open(write_jsonl(tmp_path / "arith.jsonl", chat_rows()), "rb") as fh:
        training_file = oa.files.create(file=fh, purpose="fine-tune")
    assert training_file.object == "file" and training_file.purpose == "fine-tune"
    assert training_file.filename == "arith.jsonl" and training_file.bytes > 0
    job = oa.fine_tuning.jobs.create(
        model=MODEL,
        training_file=training_file.id,
        validation_file=training_file.id,
        suffix="arith",
        seed=7,
        metadata={"team": "qa"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}}},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running"), job
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.seed == 7 and job.metadata == {"team": "qa"} and job.user_provided_suffix == "arith"

    # While it runs: a second job waits behind it (one running task per user) and is paused,
    # resumed and cancelled; files and methods that do not fit are refused by name.
    second = oa.fine_tuning.jobs.create(model=MODEL, training_file=training_file.id)
    assert second.status == "queued", second
    assert oa.fine_tuning.jobs.pause(second.id).status == "paused"
    assert oa.fine_tuning.jobs.retrieve(second.id).status == "paused"
    assert oa.fine_tuning.jobs.resume(second.id).status == "queued"
    assert oa.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        oa.fine_tuning.jobs.resume(second.id)
    told = [e.message for e in oa.fine_tuning.jobs.list_events(second.id)]
    assert told[:2] == ["Job cancelled", "Job queued again, from the start"], told
    assert "Job paused" in told, told
    with open(write_jsonl(tmp_path / "prefs.jsonl", dpo_rows()), "rb") as fh:
        prefs = oa.files.create(file=fh, purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oa.fine_tuning.jobs.create(model=MODEL, training_file=prefs.id)
    assert refused.value.body["param"] == "training_file" and "dpo" in refused.value.message
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oa.fine_tuning.jobs.create(model=MODEL, training_file=training_file.id,
                                   method={"type": "reinforcement"})
    assert refused.value.body["param"] == "method.type"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oa.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file.id)
    assert refused.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        oa.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    assert refused.value.body["param"] == "purpose"
    dpo = oa.fine_tuning.jobs.create(
        model=MODEL, training_file=prefs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert dpo.method.type == "dpo" and dpo.hyperparameters.beta == 0.2
    assert oa.fine_tuning.jobs.cancel(dpo.id).status == "cancelled"

    # Bursts of parallel requests: uploads, deletes, job creations and cancellations.
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(
            lambda i: oa.files.create(file=(f"burst-{i}.jsonl", (json.dumps(chat_rows()[i]) + "\n").encode()),
                                      purpose="fine-tune"),
            range(8)))
        assert len({f.id for f in made}) == 8 and all(f.bytes > 0 for f in made)
        listed_files = {f.id for f in oa.files.list()}
        assert {f.id for f in made} <= listed_files
        assert all(d.deleted for d in pool.map(lambda f: oa.files.delete(f.id), made))
        assert not {f.id for f in made} & {f.id for f in oa.files.list()}
        burst = list(pool.map(
            lambda i: oa.fine_tuning.jobs.create(model=MODEL, training_file=training_file.id,
                                                 suffix=f"burst-{i}"),
            range(6)))
        assert len({j.id for j in burst}) == 6 and all(j.status == "queued" for j in burst)
        cancelled = list(pool.map(lambda j: oa.fine_tuning.jobs.cancel(j.id), burst))
        assert all(j.status == "cancelled" for j in cancelled), cancelled
    burst_ids = {j.id for j in burst}

    deadline = time.monotonic() + 900
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
        job = oa.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.finished_at >= job.created_at

    # Events, newest first, paged by the client itself (limit 3 → several pages).
    events = list(oa.fine_tuning.jobs.list_events(job.id, limit=3))
    assert len(events) > 6 and len({e.id for e in events}) == len(events)
    assert events[0].message.startswith("The job has successfully completed"), events[0]
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == sorted(steps, reverse=True) and steps[0] == 8, steps
    losses = [e.data["train_loss"] for e in events if "train_loss" in e.data]
    assert losses[0] < losses[-1], losses

    # A checkpoint at each epoch's end (16 rows in batches of 4: steps 4 and 8).
    checkpoints = oa.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 4], checkpoints
    assert checkpoints[0].fine_tuning_job_id == job.id
    assert checkpoints[0].metrics.train_loss == losses[0]
    # The validation file, scored at each save (and once more at the end).
    valid = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert len(valid) >= 2 and checkpoints[0].metrics.valid_loss == valid[0], valid

    # The model it made answers through the chat endpoint.
    answer = oa.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=16,
    ).choices[0].message.content
    assert answer == ANSWER
    # --- end of the script -----------------------------------------------------------------

    # The same job in ferrotune's own API (what the web UI shows).
    task = client.task(job.id.removeprefix("ftjob-"))
    assert task["status"] == "completed" and task["model_id"] == job.fine_tuned_model
    assert task["name"] == "arith"
    listed = [j.id for j in oa.fine_tuning.jobs.list(limit=20) if j.id not in burst_ids]
    assert listed[:3] == [dpo.id, second.id, job.id], listed
    assert training_file.id in [f.id for f in oa.files.list()]
    assert oa.files.content(training_file.id).text.count("\n") == 16
    with pytest.raises(openai.NotFoundError):
        oa.fine_tuning.jobs.retrieve("ftjob-nope")
    assert oa.files.delete(prefs.id).deleted

    # The job's settings as a training template, and a task started from it (then cancelled).
    saved = client.save_template("arith job", task_id=task["task_id"])
    assert saved["settings"]["lora_rank"] == task["lora_rank"] and "dataset_id" not in saved["settings"]
    assert "arith job" in [t["name"] for t in client.templates()]
    again = client.create_task_from_template(
        saved["template_id"], "again", dataset_id=training_file.id.removeprefix("file-"), max_steps=1)
    assert client.task(again["task_id"])["learning_rate"] == task["learning_rate"]
    client.cancel(again["task_id"])
    client.delete_template(saved["template_id"])
    assert "arith job" not in [t["name"] for t in client.templates()]
