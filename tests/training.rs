//! Training for real: the server installs (or finds) the managed Python environment, pulls
//! SmolLM2-135M-Instruct, and trains a LoRA with LlamaFactory in a worker process on CPU.

mod common;

use std::time::{Duration, Instant};

use common::{
    Client, MODEL, Server, training_server, upload_arithmetic, wait_for_environment_and_model,
    wait_until,
};
use serde_json::{Value, json};

/// A server on the test models with the training environment (installed when missing),
/// users alice and bob, and alice's arithmetic dataset (its id).
async fn server_with_a_dataset() -> (Server, Client, Client, String) {
    server_with_a_dataset_and(&[]).await
}

/// [`server_with_a_dataset`] with extra settings.
async fn server_with_a_dataset_and(env: &[(&str, &str)]) -> (Server, Client, Client, String) {
    let server = training_server(env);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let dataset_id = upload_arithmetic(&alice).await;
    wait_for_environment_and_model(&alice).await;
    (server, alice, bob, dataset_id)
}

#[tokio::test]
async fn a_lora_trains_for_real_and_its_adapter_is_registered() {
    // Workers are watched for silence: a line of 3 s is crossed between the heartbeats
    // (every 10 s) while the worker imports and loads, so the alert is raised and resolved.
    let (server, alice, bob, dataset_id) = server_with_a_dataset_and(&[
        ("FERROTUNE_ALERT_WORKER_SILENT_SECS", "3"),
        ("FERROTUNE_ALERT_CHECK_SECS", "1"),
    ])
    .await;
    // Alice is the administrator (the first account): her alert webhook hears of it.
    let (alert_base, alerts_received) = common::receiver().await;
    let alert_hook = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{alert_base}/ok"), "events": ["alert.*"]}),
        )
        .await;
    assert_eq!(alert_hook.status, 201, "{:?}", alert_hook.body);
    // A webhook on a loopback receiver gets the task's events, signed.
    let (hook_base, received) = common::receiver().await;
    let hook = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{hook_base}/ok"), "events": ["task.*"]}),
        )
        .await;
    assert_eq!(hook.status, 201, "{:?}", hook.body);
    let hook_secret = hook.body["secret"].as_str().unwrap().to_string();

    let submitted = Instant::now();
    let r = alice
        .post(
            "/api/tasks",
            json!({
                "name": "arith-lora", "model_name": MODEL, "dataset_id": dataset_id,
                "epochs": 2, "learning_rate": 0.001, "batch_size": 4, "cutoff_len": 128,
                "logging_steps": 1, "save_steps": 4, "lora_rank": 8,
                "system": "You are a calculator.",
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["status"], "queued");
    assert_eq!(
        r.body["template"], "smollm2",
        "template chosen from the model"
    );
    let id = r.body["task_id"].as_str().unwrap().to_string();
    assert_eq!(
        bob.get(&format!("/api/tasks/{id}")).await.status,
        404,
        "not bob's"
    );

    // Live progress: the first step shows up while the task runs.
    let first = wait_until("the first step", Duration::from_secs(600), async || {
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        assert_ne!(
            t["status"], "failed",
            "task failed: {} / {}",
            t["error"], t["diagnosis"]
        );
        (t["progress"]["current_step"].as_u64().unwrap_or(0) >= 1).then_some(t)
    })
    .await;
    let to_first_step = submitted.elapsed();
    assert!(
        first["progress"]["total_steps"].as_u64().unwrap_or(0) >= 8,
        "{first}"
    );

    let done = wait_until("the task to finish", Duration::from_secs(900), async || {
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
    })
    .await;
    let total = submitted.elapsed();
    let logs = alice
        .get(&format!("/api/tasks/{id}/logs?tail=400"))
        .await
        .body["logs"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(
        done["status"], "completed",
        "task: {done}\nlog tail:\n{logs}"
    );
    assert!(!logs.trim().is_empty(), "the log is not empty");
    assert_eq!(done["progress"]["percentage"], 100.0);

    // The webhook: task.queued, task.started, task.succeeded for this task, each signed,
    // task.succeeded within a second of the task's end.
    let events = wait_until(
        "task.succeeded at the webhook",
        Duration::from_secs(10),
        async || {
            let got = received.lock().unwrap().clone();
            got.iter()
                .any(|r| r.body.contains("task.succeeded"))
                .then(|| Value::from(got.len()))
        },
    )
    .await;
    let got = received.lock().unwrap().clone();
    let types: Vec<String> = got
        .iter()
        .map(|r| {
            assert!(common::verify(&hook_secret, r), "signed: {r:?}");
            let b: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(b["data"]["task_id"], id.as_str());
            b["type"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        types,
        ["task.queued", "task.started", "task.succeeded"],
        "{events}"
    );
    let succeeded = got.last().unwrap();
    let body: Value = serde_json::from_str(&succeeded.body).unwrap();
    assert_eq!(body["data"]["model_id"], done["model_id"]);
    let finished = time::OffsetDateTime::parse(
        done["finished_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let latency = succeeded.wall - finished;
    eprintln!(
        "task.succeeded reached the webhook {:.0} ms after the task's end",
        latency.as_seconds_f64() * 1e3
    );
    assert!(latency < time::Duration::seconds(1), "{latency}");

    // The silent-worker alert was raised for this task, and resolved once it ended.
    let worker_key = format!("worker:{id}");
    wait_until(
        "the worker alert's resolution at the webhook",
        Duration::from_secs(10),
        async || {
            let got = alerts_received.lock().unwrap().clone();
            let kinds: Vec<(String, String)> = got
                .iter()
                .map(|r| {
                    let b: Value = serde_json::from_str(&r.body).unwrap();
                    (
                        b["type"].as_str().unwrap_or("").to_string(),
                        b["data"]["key"].as_str().unwrap_or("").to_string(),
                    )
                })
                .filter(|(_, k)| *k == worker_key)
                .collect();
            (kinds.first().is_some_and(|(t, _)| t == "alert.raised")
                && kinds.last().is_some_and(|(t, _)| t == "alert.resolved"))
            .then(|| Value::from(kinds.len()))
        },
    )
    .await;
    let raised = alerts_received
        .lock()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
        .find(|b| b["type"] == "alert.raised" && b["data"]["key"] == worker_key.as_str())
        .unwrap();
    assert_eq!(raised["data"]["kind"], "worker_silent");
    assert_eq!(raised["data"]["unit"], "s");
    assert!(raised["data"]["value"].as_f64().unwrap() >= 3.0, "{raised}");
    let active = alice.get("/api/system/alerts").await.body;
    assert!(
        !active.to_string().contains(&worker_key),
        "no longer on: {active}"
    );

    let points = alice.get(&format!("/api/tasks/{id}/metrics")).await.body["points"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(points.len() >= 4, "loss points arrived: {points:?}");
    let first_loss = points[0]["loss"].as_f64().unwrap();
    let last_loss = points[points.len() - 1]["loss"].as_f64().unwrap();
    assert!(
        last_loss < first_loss,
        "loss fell: {first_loss} → {last_loss}"
    );

    let out = server.task_output(&done);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} in {}", out.display());
    }

    let model_id = done["model_id"].as_str().expect("model_id").to_string();
    let models = alice.get("/api/files/models").await.body["models"]
        .as_array()
        .cloned()
        .unwrap();
    let m = models
        .iter()
        .find(|m| m["model_id"] == model_id.as_str())
        .expect("registered");
    assert_eq!(m["kind"], "adapter");
    assert_eq!(m["base_model"], MODEL);
    assert_eq!(m["task_id"], id.as_str());
    assert!(m["size"].as_u64().unwrap() > 1_000_000);
    assert!(
        models
            .iter()
            .any(|m| m["kind"] == "base" && m["name"] == MODEL)
    );
    let bobs = bob.get("/api/files/models").await.body["models"]
        .as_array()
        .cloned()
        .unwrap();
    assert!(
        !bobs.iter().any(|m| m["model_id"] == model_id.as_str()),
        "adapters are their owner's"
    );
    assert_eq!(
        bob.get(&format!("/api/files/models/{model_id}"))
            .await
            .status,
        404
    );

    // The model records how it was trained, and chats that way: its system prompt is the
    // default (a conversation without one is the same prompt as one that names it).
    let detail = alice
        .get(&format!("/api/files/models/{model_id}"))
        .await
        .body;
    assert_eq!(detail["template"], "smollm2", "{detail}");
    assert_eq!(detail["system_prompt"], "You are a calculator.", "{detail}");
    assert!(
        detail.get("template_warning").is_none(),
        "SmolLM2's own template is ChatML, like smollm2's: {detail}"
    );
    let prompt_tokens = async |model: &str, system: Option<&str>| {
        let mut messages = vec![json!({"role": "user", "content": "What is 2 plus 3?"})];
        if let Some(s) = system {
            messages.insert(0, json!({"role": "system", "content": s}));
        }
        let r = alice
            .post(
                "/v1/chat/completions",
                json!({"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let default = prompt_tokens(&model_id, None).await;
    assert_eq!(
        default,
        prompt_tokens(&model_id, Some("You are a calculator.")).await
    );
    assert_ne!(
        default,
        prompt_tokens(&model_id, Some("Answer in French, please.")).await
    );
    assert_ne!(
        default,
        prompt_tokens(MODEL, None).await,
        "the base model keeps its own default"
    );

    let (status, yaml, _) = alice.get_bytes(&format!("/api/tasks/{id}/config")).await;
    assert_eq!(status, 200);
    let yaml = String::from_utf8(yaml).unwrap();
    assert!(yaml.contains("stage: \"sft\""), "{yaml}");
    assert!(yaml.contains("template: \"smollm2\""), "{yaml}");

    let step_of = |p: &Value| p["step"].as_f64().unwrap_or(0.0);
    let t_of = |p: &Value| p["t"].as_f64().unwrap_or(0.0);
    let (p0, pn) = (&points[0], &points[points.len() - 1]);
    let steps = step_of(pn);
    let train_time = (t_of(pn) - t_of(p0)).max(1e-3) * steps / (step_of(pn) - step_of(p0)).max(1.0);
    eprintln!(
        "training report: POST→first step {:.1} s, POST→completed {:.1} s, {} steps, {:.2} steps/s (worker clock), loss {first_loss:.3} → {last_loss:.3}",
        to_first_step.as_secs_f64(),
        total.as_secs_f64(),
        steps,
        steps / train_time
    );
}

#[tokio::test]
async fn bad_task_requests_are_422_before_anything_runs() {
    let server = Server::start(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let up = alice
        .upload("d.json", br#"[{"instruction":"a","output":"b"}]"#.to_vec())
        .await;
    let ds = up.body["file_id"].as_str().unwrap().to_string();
    let path = up.body["file_path"].as_str().unwrap().to_string();
    let base = json!({"name": "t", "model_name": MODEL, "dataset_id": ds});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, code) in [
        (with(json!({"learning_rate": -1})), "invalid_spec"),
        (with(json!({"epochs": 0})), "invalid_spec"),
        (with(json!({"stage": "ppo"})), "invalid_body"),
        (with(json!({"unknown_field": 1})), "invalid_body"),
        (with(json!({"template": "nonsense"})), "invalid_spec"),
        (with(json!({"output_dir": "../../etc"})), "invalid_spec"),
        (with(json!({"seed": u64::MAX})), "invalid_spec"),
        (with(json!({"gpu_ids": [999]})), "invalid_spec"),
        (with(json!({"gpu_ids": [0, 0]})), "invalid_spec"),
        (with(json!({"quantization_bit": 2})), "invalid_spec"),
        (
            with(json!({"quantization_bit": 4, "finetuning_type": "full"})),
            "invalid_spec",
        ),
        (with(json!({"deepspeed": 3})), "invalid_spec"),
        // Two GPUs for ZeRO: this server has none to give.
        (with(json!({"deepspeed": 2, "gpus": 2})), "invalid_spec"),
        (with(json!({"dataset_id": "nope"})), "dataset_not_found"),
    ] {
        let r = alice.post("/api/tasks", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert_eq!(r.code(), code, "{body}: {:?}", r.body);
    }
    // No base model in this server's (empty) models dir.
    let r = alice.post("/api/tasks", base.clone()).await;
    assert_eq!(r.code(), "model_not_found");
    // Bob can use neither alice's dataset id nor its path.
    let r = bob.post("/api/tasks", base.clone()).await;
    assert_eq!(r.code(), "dataset_not_found");
    let r = bob
        .post(
            "/api/tasks",
            json!({"name": "t", "model_name": MODEL, "dataset_path": path}),
        )
        .await;
    assert_eq!(r.code(), "dataset_not_found");
    let r = bob
        .post(
            "/api/tasks",
            json!({"name": "t", "model_name": MODEL, "dataset_path": "/etc/passwd"}),
        )
        .await;
    assert_eq!(r.code(), "dataset_not_found");
    assert!(
        alice.get("/api/tasks").await.body["tasks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        !server.data_path().join("tasks").exists()
            || std::fs::read_dir(server.data_path().join("tasks"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// QLoRA: the base loaded in 4 bits by bitsandbytes (on the CPU here: bitsandbytes 0.50 has
/// CPU kernels) while the LoRA trains; the adapter is registered and chats like any other.
#[tokio::test]
async fn a_qlora_trains_over_a_4_bit_base() {
    let (_server, alice, _bob, dataset_id) = server_with_a_dataset().await;
    let r = alice
        .post(
            "/api/tasks",
            json!({
                "name": "arith-qlora", "model_name": MODEL, "dataset_id": dataset_id,
                "quantization_bit": 4, "max_steps": 2, "learning_rate": 0.001,
                "batch_size": 4, "cutoff_len": 64, "logging_steps": 1, "save_steps": 1000,
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["task_id"].as_str().unwrap().to_string();
    let t = alice.get(&format!("/api/tasks/{id}")).await.body;
    assert_eq!(t["quantization_bit"], 4, "{t}");
    let done = wait_until("the QLoRA task", Duration::from_secs(900), async || {
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
    })
    .await;
    let logs = alice
        .get(&format!("/api/tasks/{id}/logs?tail=400"))
        .await
        .body["logs"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(done["status"], "completed", "{done}\n{logs}");
    assert!(
        logs.contains("Quantizing model to 4 bit with bitsandbytes"),
        "LlamaFactory quantised the base: {logs}"
    );
    let model_id = done["model_id"].as_str().expect("model_id");
    let r = alice
        .post(
            "/v1/chat/completions",
            json!({
                "model": model_id, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "What is 3 plus 4?"}],
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// A full fine-tune is a model of its owner's: listed for chat, answered through the same
/// engine (its float weights quantised at load, cached in its folder), downloadable without
/// that cache.
#[tokio::test]
async fn a_full_fine_tune_is_a_model_that_chats() {
    let (server, alice, bob, dataset_id) = server_with_a_dataset().await;

    let r = alice
        .post(
            "/api/tasks",
            json!({
                "name": "arith-full", "model_name": MODEL, "dataset_id": dataset_id,
                "finetuning_type": "full", "epochs": 1, "learning_rate": 0.00001,
                "batch_size": 8, "cutoff_len": 64, "logging_steps": 1, "save_steps": 1000,
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["task_id"].as_str().unwrap().to_string();
    let done = wait_until("the full fine-tune", Duration::from_secs(900), async || {
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
    })
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let model_id = done["model_id"].as_str().expect("model_id").to_string();

    let available = alice.get("/api/models/available").await.body["models"]
        .as_array()
        .cloned()
        .unwrap();
    let m = available
        .iter()
        .find(|m| m["model_id"] == model_id.as_str())
        .expect("a full fine-tune is offered for chat");
    assert_eq!(m["kind"], "full");
    let v1 = alice.get("/v1/models").await.body;
    assert!(
        v1["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == model_id.as_str() && m["kind"] == "full"),
        "{v1}"
    );

    let chat = json!({
        "model": model_id, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is 3 plus 4?"}],
    });
    let r = alice.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!answer.trim().is_empty(), "{:?}", r.body);
    assert_eq!(r.body["model"], model_id.as_str());
    assert_eq!(
        bob.post("/v1/chat/completions", chat).await.status,
        404,
        "not bob's"
    );

    // Its weights were quantised at load and cached in its own folder…
    let rel = m["model_path"].as_str().unwrap();
    let folder = server.data_path().join(rel);
    let cache: Vec<String> = std::fs::read_dir(folder.join(".ferrotune"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        cache.iter().any(|n| n.starts_with("weights-q8_0-")),
        "{cache:?} in {}",
        folder.display()
    );
    // …which its download leaves out.
    let (status, bytes, _) = alice
        .get_bytes(&format!("/api/files/models/{model_id}/download"))
        .await;
    assert_eq!(status, 200);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("config.json")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with(".safetensors")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains(".ferrotune")), "{names:?}");
}

/// English and Chinese sums: a format and a skill the LoRA learns, so held-out rows show it.
fn bilingual_sums() -> Vec<u8> {
    let rows: Vec<Value> = (0..40)
        .map(|i| {
            let (a, b) = (i % 9 + 1, (i * 7) % 8 + 1);
            if i % 2 == 0 {
                json!({"instruction": format!("What is {a} plus {b}?"), "output": format!("{a} plus {b} is {}.", a + b)})
            } else {
                json!({"instruction": format!("{a}加{b}等于多少？"), "output": format!("{a}加{b}等于{}。", a + b)})
            }
        })
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

#[tokio::test]
async fn an_evaluation_shows_the_fine_tune_beating_its_base_on_held_out_rows() {
    let server = training_server(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let up = alice.upload("sums.json", bilingual_sums()).await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    let dataset_id = up.body["file_id"].as_str().unwrap().to_string();
    wait_for_environment_and_model(&alice).await;

    // Bad requests are 422s naming the field, before anything is queued.
    for (body, field) in [
        (json!({"dataset_id": dataset_id}), "model"),
        (json!({"model": MODEL}), "dataset_id"),
        (
            json!({"model": "no-such-model", "dataset_id": dataset_id}),
            "model",
        ),
        (
            json!({"model": MODEL, "dataset_id": dataset_id, "max_new_tokens": 0}),
            "max_new_tokens",
        ),
        (
            json!({"model": MODEL, "dataset_id": dataset_id, "baseline": true}),
            "baseline",
        ),
    ] {
        let r = alice.post("/api/evaluations", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(r.error().contains(field), "{body}: {:?}", r.body);
    }
    let r = alice
        .post(
            "/api/evaluations",
            json!({"model": MODEL, "dataset_id": dataset_id, "temperature": 1}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);

    // A training task that asks to be judged on the fifth of its rows it holds out.
    let r = alice
        .post(
            "/api/tasks",
            json!({"name": "sums", "model_name": MODEL, "dataset_id": dataset_id, "epochs": 3,
                   "learning_rate": 0.001, "batch_size": 4, "cutoff_len": 128, "lora_rank": 8,
                   "logging_steps": 1, "save_steps": 100, "eval_split": 0.2}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let task_id = r.body["task_id"].as_str().unwrap().to_string();
    let t = common::wait_status(
        &alice,
        &task_id,
        &["completed", "failed"],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["val_size"], 0.2);

    // Its evaluations were queued when it completed: the base (before) and the adapter (after).
    let evals = wait_until(
        "the two evaluations to finish",
        Duration::from_secs(900),
        async || {
            let list = alice.get("/api/evaluations").await.body;
            let mine: Vec<Value> = list
                .as_array()?
                .iter()
                .filter(|e| e["source_task_id"] == task_id.as_str())
                .cloned()
                .collect();
            for e in &mine {
                assert!(
                    !["failed", "cancelled"].contains(&e["status"].as_str().unwrap_or("")),
                    "{e}"
                );
            }
            (mine.len() == 2 && mine.iter().all(|e| e["status"] == "completed"))
                .then(|| json!(mine))
        },
    )
    .await;
    let candidate = evals
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["role"] == "candidate")
        .unwrap()
        .clone();
    assert_eq!(candidate["model"], t["model_id"]);
    assert_eq!(candidate["model_kind"], "adapter");
    let id = candidate["evaluation_id"].as_str().unwrap();
    // The evaluation is a task of the queue too: its log and events are the task routes'.
    let detail = alice.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(detail.body["kind"], "evaluation", "{:?}", detail.body);
    let log = alice.get(&format!("/api/tasks/{id}/logs")).await;
    assert_eq!(log.status, 200);

    let cmp = alice
        .get(&format!("/api/evaluations/{id}/comparison"))
        .await;
    assert_eq!(cmp.status, 200, "{:?}", cmp.body);
    let (before, after) = (
        &cmp.body["baseline"]["metrics"],
        &cmp.body["candidate"]["metrics"],
    );
    println!(
        "before: {before}\nafter: {after}\ndelta: {}",
        cmp.body["delta"]
    );
    assert_eq!(after["samples"], 8, "a fifth of 40 rows held out: {after}");
    for m in ["bleu_4", "rouge_1", "rouge_l"] {
        assert!(
            after[m].as_f64().unwrap() > before[m].as_f64().unwrap() + 5.0,
            "{m}: the fine-tune should beat its base: {before} vs {after}"
        );
    }
    assert!(after["perplexity"].as_f64().unwrap() < before["perplexity"].as_f64().unwrap());
    assert!(after["exact_match"].as_f64().unwrap() >= before["exact_match"].as_f64().unwrap());
    assert!(
        after["tokens_per_second"].as_f64().unwrap() > 0.0,
        "{after}"
    );
    let rows = cmp.body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    assert!(
        rows.iter()
            .any(|r| r["reference"].as_str().unwrap().contains("等于")),
        "Chinese rows are among the held-out ones: {rows:?}"
    );
    for r in rows {
        assert_ne!(r["baseline"], r["candidate"], "{r}");
    }

    // The answers download as JSON lines.
    let (status, bytes, headers) = alice
        .get_bytes(&format!("/api/evaluations/{id}/predictions"))
        .await;
    assert_eq!(status, 200);
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains(".jsonl")
    );
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.lines().count(), 8);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(
        first["predict"].is_string() && first["label"].is_string(),
        "{first}"
    );

    // Another user sees none of it; a finished evaluation cannot be cancelled.
    assert_eq!(bob.get(&format!("/api/evaluations/{id}")).await.status, 404);
    assert_eq!(
        bob.get(&format!("/api/evaluations/{id}/comparison"))
            .await
            .status,
        404
    );
    assert_eq!(
        alice
            .post(&format!("/api/evaluations/{id}/cancel"), json!({}))
            .await
            .status,
        409
    );
    // A training task is not an evaluation.
    assert_eq!(
        alice
            .get(&format!("/api/evaluations/{task_id}"))
            .await
            .status,
        404
    );

    // A test set evaluated by hand, base model alone (no baseline), cancelled while queued
    // or running: it ends cancelled and leaves nothing running.
    let r = alice
        .post(
            "/api/evaluations",
            json!({"model": MODEL, "dataset_id": dataset_id, "max_samples": 4}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert!(r.body["baseline_id"].is_null());
    let eid = r.body["evaluation_id"].as_str().unwrap();
    let r = alice
        .post(&format!("/api/evaluations/{eid}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    common::wait_status(&alice, eid, &["cancelled"], Duration::from_secs(120)).await;
    let e = alice
        .get(&format!("/api/evaluations/{eid}/predictions"))
        .await;
    assert_eq!(e.status, 409, "{:?}", e.body);
    drop(server);
}

/// OpenAI's DPO JSONL: the right sum preferred over a wrong one.
fn dpo_rows() -> Vec<u8> {
    let mut out = String::new();
    for i in 0..12u32 {
        let (a, b) = (i % 5 + 1, i % 4 + 2);
        let row = json!({
            "input": {"messages": [{"role": "user", "content": format!("What is {a} plus {b}?")}]},
            "preferred_output": [{"role": "assistant", "content": format!("{a} plus {b} is {}.", a + b)}],
            "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
        });
        out.push_str(&row.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// LlamaFactory's KTO shape: messages with a boolean `label`, good and bad answers.
fn kto_rows() -> Vec<u8> {
    let rows: Vec<Value> = (0..12u32)
        .map(|i| {
            let (a, b) = (i % 5 + 1, i % 3 + 1);
            let good = i % 2 == 0;
            let answer = if good {
                format!("{a} plus {b} is {}.", a + b)
            } else {
                format!("{a} plus {b} is {}.", a + b + 7)
            };
            json!({"messages": [{"role": "user", "content": format!("What is {a} plus {b}?")},
                                {"role": "assistant", "content": answer}],
                   "label": good})
        })
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

#[tokio::test]
async fn preference_kto_and_plain_text_stages_train_and_chat() {
    let (server, alice, _bob, sft_id) = server_with_a_dataset().await;
    let upload = async |name: &str, bytes: Vec<u8>, kind: &str| {
        let r = alice.upload(name, bytes).await;
        assert_eq!(r.status, 201, "{name}: {:?}", r.body);
        assert_eq!(r.body["kind"], kind, "{name}: {:?}", r.body);
        r.body["file_id"].as_str().unwrap().to_string()
    };
    let dpo = upload("prefs.jsonl", dpo_rows(), "preference").await;
    let kto = upload("kto.json", kto_rows(), "kto").await;
    let corpus: String = (0..16)
        .map(|i| format!("Ferrotune note {i}: sums are written as words, two plus two is four.\n"))
        .collect();
    let text = upload("corpus.txt", corpus.into_bytes(), "text").await;
    // The stored preview is what LlamaFactory reads.
    let preview = alice
        .get(&format!("/api/files/datasets/{dpo}/preview?limit=1"))
        .await;
    assert_eq!(preview.status, 200, "{:?}", preview.body);
    let row = preview.body["rows"][0].clone();
    assert_eq!(row["chosen"]["role"], "assistant", "{}", preview.body);
    assert_eq!(row["messages"][0]["role"], "user", "{}", preview.body);

    let base = json!({
        "model_name": MODEL, "epochs": 1, "learning_rate": 0.0005, "batch_size": 4,
        "cutoff_len": 64, "logging_steps": 1, "save_steps": 1000, "lora_rank": 4,
        "max_steps": 3,
    });
    let with = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    // A stage that does not fit the data is a 422 naming both.
    for (body, says) in [
        (
            json!({"name": "x", "dataset_id": dpo, "stage": "sft"}),
            "use stage dpo or rm",
        ),
        (
            json!({"name": "x", "dataset_id": sft_id, "stage": "pt"}),
            "use stage sft",
        ),
        (
            json!({"name": "x", "dataset_id": kto, "stage": "dpo"}),
            "use stage kto",
        ),
        (
            json!({"name": "x", "dataset_id": text, "pref_beta": 0.1}),
            "pref_beta",
        ),
        (
            json!({"name": "x", "dataset_id": dpo, "eval_split": 0.2}),
            "eval_split",
        ),
        (
            json!({"name": "x", "dataset_id": kto, "use_dora": true, "pissa": true}),
            "without DoRA's magnitudes",
        ),
        (
            json!({"name": "x", "dataset_id": kto, "use_dora": true, "finetuning_type": "full"}),
            "use_dora",
        ),
    ] {
        let r = alice.post("/api/tasks", with(body.clone())).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(r.body.to_string().contains(says), "{body}: {:?}", r.body);
    }

    // Other LlamaFactory arguments are checked against its own parser before queueing.
    for (extra, says) in [
        (json!({"optimm": "adamw_torch"}), "did you mean `optim`"),
        (json!({"adam_beta2": "high"}), "expects a number"),
        (json!({"use_dora": true}), "use `use_dora`"),
        (json!({"num_train_epochs": 2}), "use `epochs`"),
        (json!({"cache_dir": "/tmp"}), "not offered"),
    ] {
        let body = with(json!({"name": "x", "dataset_id": text, "extra_args": extra}));
        let r = alice.post("/api/tasks", body).await;
        assert_eq!(r.status, 422, "{extra}: {:?}", r.body);
        assert!(r.body.to_string().contains(says), "{extra}: {:?}", r.body);
    }

    // The stage follows the dataset when the task names none.
    let mut ids = Vec::new();
    for (name, dataset, extra, stage) in [
        (
            "dpo",
            &dpo,
            json!({"pref_beta": 0.1, "pref_loss": "sigmoid"}),
            "dpo",
        ),
        // A DoRA (weight-decomposed LoRA): chat applies its magnitudes.
        ("kto", &kto, json!({"use_dora": true}), "kto"),
        // Time-based checkpoints too: every 0.3 s here, so at each step (save_steps is 1000);
        // and the settings people tune, with an argument only LlamaFactory's parser knows.
        (
            "pt",
            &text,
            json!({"save_minutes": 0.005, "packing": true, "neftune_noise_alpha": 5,
                   "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 1,
                   "weight_decay": 0.01, "max_grad_norm": 0.5, "use_rslora": true,
                   "loraplus_lr_ratio": 4,
                   "extra_args": {"optim": "adamw_torch", "adam_beta2": 0.99}}),
            "pt",
        ),
    ] {
        let mut body = with(extra);
        body["name"] = json!(name);
        body["dataset_id"] = json!(dataset);
        let r = alice.post("/api/tasks", body).await;
        assert_eq!(r.status, 201, "{name}: {:?}", r.body);
        let id = r.body["task_id"].as_str().unwrap().to_string();
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        assert_eq!(t["stage"], stage, "{t}");
        ids.push((name, id));
    }
    for (name, id) in &ids {
        let done = wait_until(name, Duration::from_secs(900), async || {
            let t = alice.get(&format!("/api/tasks/{id}")).await.body;
            matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
        })
        .await;
        assert_eq!(done["status"], "completed", "{name}: {done}");
        let points = alice.get(&format!("/api/tasks/{id}/metrics")).await.body["points"]
            .as_array()
            .cloned()
            .unwrap();
        let last = points.last().cloned().unwrap_or_default();
        assert!(
            last["loss"].as_f64().is_some_and(f64::is_finite),
            "{name}: {points:?}"
        );
        if *name != "pt" {
            // The preference stages' own figures reach the chart.
            assert!(
                last["extra"]["rewards/margins"].as_f64().is_some(),
                "{name}: {last}"
            );
        }
        let secs = |k: &str| {
            time::OffsetDateTime::parse(
                done[k].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        eprintln!(
            "{name}: {:.1} s, final loss {}, extra {}",
            (secs("finished_at") - secs("started_at")).as_seconds_f64(),
            last["loss"],
            last["extra"]
        );
        // What was trained chats.
        let model_id = done["model_id"].as_str().expect("model_id").to_string();
        let r = alice
            .post(
                "/v1/chat/completions",
                json!({"model": model_id, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is 2 plus 3?"}]}),
            )
            .await;
        if *name == "dpo" {
            bundle_trains_with_llamafactory_cli(&alice, id, &points).await;
        }
        if *name == "kto" {
            let (_, yaml, _) = alice.get_bytes(&format!("/api/tasks/{id}/config")).await;
            assert!(String::from_utf8_lossy(&yaml).contains("use_dora: true"));
            let adapter =
                std::fs::read(server.task_output(&done).join("adapter_model.safetensors")).unwrap();
            assert!(
                adapter
                    .windows(b"lora_magnitude_vector".len())
                    .any(|w| w == b"lora_magnitude_vector"),
                "a DoRA adapter carries its magnitudes"
            );
        }
        if *name == "pt" {
            let (_, yaml, _) = alice.get_bytes(&format!("/api/tasks/{id}/config")).await;
            let yaml = String::from_utf8(yaml).unwrap();
            for line in [
                "packing: true",
                "neftune_noise_alpha: 5",
                "lr_scheduler_type: \"constant_with_warmup\"",
                "warmup_steps: 1",
                "weight_decay: 0.01",
                "max_grad_norm: 0.5",
                "use_rslora: true",
                "loraplus_lr_ratio: 4",
                "optim: \"adamw_torch\"",
                "adam_beta2: 0.99",
            ] {
                assert!(yaml.contains(line), "{line} in {yaml}");
            }
            let saved = std::fs::read_dir(server.task_output(&done))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
                .count();
            assert!(saved >= 2, "time-based checkpoints: {saved}");
        }
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        let answer = r.body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!answer.trim().is_empty(), "{name}: {:?}", r.body);
    }
}

/// The task's portable bundle, unpacked in a fresh folder, trains with LlamaFactory's own
/// `llamafactory-cli` (from the managed environment) unchanged.
async fn bundle_trains_with_llamafactory_cli(alice: &Client, id: &str, points: &[Value]) {
    let (status, bytes, _) = alice
        .get_bytes(&format!("/api/tasks/{id}/artifacts/bundle"))
        .await;
    assert_eq!(status, 200);
    let dir = tempfile::tempdir().unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]))
        .unpack(dir.path())
        .unwrap();
    let bundle = dir.path().join(format!("{id}-bundle"));
    for f in ["train.yaml", "README.txt", "data/dataset_info.json"] {
        assert!(bundle.join(f).is_file(), "{f} in the bundle");
    }
    let yaml = std::fs::read_to_string(bundle.join("train.yaml")).unwrap();
    assert!(yaml.contains("dataset_dir: \"data\""), "{yaml}");
    assert!(yaml.contains("stage: \"dpo\""), "{yaml}");
    assert!(
        !yaml.contains("/tasks/"),
        "no path into the server's task folder: {yaml}"
    );
    let python = match std::env::var("FERROTUNE_TRAIN_PYTHON") {
        Ok(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
                .args(["setup", "--print-python"])
                .output()
                .unwrap();
            std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let cli = python.parent().unwrap().join("llamafactory-cli");
    let started = Instant::now();
    let run = tokio::process::Command::new(&cli)
        .args(["train", "train.yaml"])
        .current_dir(&bundle)
        .env("HF_HUB_OFFLINE", "1")
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "llamafactory-cli train failed: {}",
        &log[log.len().saturating_sub(4000)..]
    );
    assert!(
        bundle
            .join("output")
            .join("adapter_model.safetensors")
            .is_file(),
        "the adapter is written to the bundle's output/"
    );
    // The same run: the same losses step by step.
    let state: Value = serde_json::from_slice(
        &std::fs::read(bundle.join("output").join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let theirs: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect();
    let ours: Vec<f64> = points.iter().filter_map(|p| p["loss"].as_f64()).collect();
    assert_eq!(theirs.len(), ours.len(), "{theirs:?} vs {ours:?}");
    for (a, b) in theirs.iter().zip(&ours) {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "{theirs:?} vs {ours:?}"
        );
    }
    eprintln!(
        "the bundle trained with llamafactory-cli in {:.1} s, losses {theirs:?} (the task's: {ours:?})",
        started.elapsed().as_secs_f64()
    );
}
