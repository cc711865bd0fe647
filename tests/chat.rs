//! Chat with what you trained: a LoRA trained through the real pipeline, then answered by the
//! candle engine through the OpenAI-compatible API, the original chat API and saved sessions.

mod common;

use std::time::Duration;

use common::{
    Client, MODEL, submit_task, training_server, upload_arithmetic, wait_for_environment_and_model,
    wait_status,
};
use serde_json::{Value, json};

async fn trained_adapter(alice: &Client) -> String {
    let ds = upload_arithmetic(alice).await;
    wait_for_environment_and_model(alice).await;
    let id = submit_task(
        alice,
        &ds,
        json!({"name": "arith", "epochs": 2, "cutoff_len": 128, "lora_rank": 8, "save_steps": 100}),
    )
    .await;
    let t = wait_status(
        alice,
        &id,
        &["completed", "failed"],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(t["status"], "completed", "{t}");
    t["model_id"].as_str().expect("model_id").to_string()
}

fn ask(model: &str, question: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 32,
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body
}

#[tokio::test]
async fn a_trained_adapter_answers_through_every_chat_api() {
    let server = training_server(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let model_id = trained_adapter(&alice).await;

    // /v1/models: base models for everyone, the adapter for its owner only.
    let list = alice.get("/v1/models").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["object"], "list");
    let ids: Vec<&str> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&MODEL) && ids.contains(&model_id.as_str()),
        "{ids:?}"
    );
    let bobs = bob.get("/v1/models").await.body;
    assert!(!bobs.to_string().contains(&model_id));

    // The adapter shows its training; the base model alone does not answer the same way.
    let r = alice
        .post(
            "/v1/chat/completions",
            ask(&model_id, "What is 3 plus 4?", json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer = r.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        answer.trim(),
        "3 plus 4 is 7.",
        "the adapter learnt the dataset's answer"
    );
    assert_eq!(r.body["object"], "chat.completion");
    assert_eq!(r.body["model"], model_id.as_str());
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
    let usage = &r.body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let base = alice
        .post(
            "/v1/chat/completions",
            ask(MODEL, "What is 3 plus 4?", json!({})),
        )
        .await;
    assert_eq!(base.status, 200);
    assert_ne!(
        base.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim(),
        answer.trim()
    );

    // Streaming gives the same text, chunk by chunk, ending with [DONE].
    let mut req = alice
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(alice.token.as_deref().unwrap())
        .json(&ask(
            &model_id,
            "What is 3 plus 4?",
            json!({"stream": true}),
        ));
    req = req.header("accept", "text/event-stream");
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = resp.text().await.unwrap();
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "role chunk, text chunks, final chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Same seed, same text when sampling.
    let sampled = |seed: u64| {
        ask(
            MODEL,
            "Write a word.",
            json!({"temperature": 0.9, "seed": seed, "max_tokens": 12}),
        )
    };
    let a = alice.post("/v1/chat/completions", sampled(7)).await.body;
    let b = alice.post("/v1/chat/completions", sampled(7)).await.body;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );

    // A stop string ends the answer before it.
    let stopped = alice
        .post(
            "/v1/chat/completions",
            ask(&model_id, "What is 3 plus 4?", json!({"stop": [" is"]})),
        )
        .await;
    assert_eq!(
        stopped.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim(),
        "3 plus 4"
    );
    assert_eq!(stopped.body["choices"][0]["finish_reason"], "stop");

    // Errors are OpenAI-shaped on /v1; another user's adapter does not exist for them.
    let r = bob
        .post("/v1/chat/completions", ask(&model_id, "hi", json!({})))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["type"], "not_found_error", "{:?}", r.body);
    assert!(r.body["error"]["message"].is_string());
    let r = c.get("/v1/models").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["type"], "authentication_error");
    let r = alice
        .post(
            "/v1/chat/completions",
            ask(MODEL, "hi", json!({"temperature": -1})),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");

    // The original API, by model id and by model path.
    let models = alice.get("/api/models/available").await.body;
    let adapter_path = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model_id"] == model_id.as_str())
        .unwrap()["model_path"]
        .as_str()
        .unwrap()
        .to_string();
    for body in [
        json!({"model_id": model_id, "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "temperature": 0, "max_tokens": 32}),
        json!({"model_path": adapter_path, "messages": [{"role": "user", "content": "What is 3 plus 4?"}], "temperature": 0, "max_tokens": 32}),
    ] {
        let r = alice.post("/api/chat/completion", body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["role"], "assistant");
        assert_eq!(r.body["content"].as_str().unwrap().trim(), "3 plus 4 is 7.");
    }
    let r = bob
        .post(
            "/api/chat/completion",
            json!({"model_path": adapter_path, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, 404);

    // Saved sessions: create, chat into it, list, rename, export, delete.
    let s = alice
        .post(
            "/api/chat/sessions",
            json!({"title": "Sums", "model": model_id}),
        )
        .await;
    assert_eq!(s.status, 201, "{:?}", s.body);
    let sid = s.body["session_id"].as_str().unwrap().to_string();
    let r = alice
        .post(
            "/api/chat/completion",
            json!({"model_id": model_id, "session_id": sid, "temperature": 0, "max_tokens": 32,
                   "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let full = alice.get(&format!("/api/chat/sessions/{sid}")).await.body;
    let msgs = full["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(
        msgs[1]["content"].as_str().unwrap().trim(),
        "3 plus 4 is 7."
    );
    assert_eq!(
        alice.get("/api/chat/sessions").await.body["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = alice
        .patch(
            &format!("/api/chat/sessions/{sid}"),
            json!({"title": "Arithmetic"}),
        )
        .await;
    assert_eq!(r.body["title"], "Arithmetic");
    let (status, md, _) = alice
        .get_bytes(&format!("/api/chat/sessions/{sid}/export?format=markdown"))
        .await;
    assert_eq!(status, 200);
    let md = String::from_utf8(md).unwrap();
    assert!(
        md.starts_with("# Arithmetic\n") && md.contains("## Assistant\n\n3 plus 4 is 7."),
        "{md}"
    );
    let (status, js, _) = alice
        .get_bytes(&format!("/api/chat/sessions/{sid}/export?format=json"))
        .await;
    assert_eq!(status, 200);
    let js: Value = serde_json::from_slice(&js).unwrap();
    assert_eq!(js["messages"].as_array().unwrap().len(), 2);
    assert_eq!(
        bob.get(&format!("/api/chat/sessions/{sid}")).await.status,
        404
    );
    assert_eq!(
        bob.delete(&format!("/api/chat/sessions/{sid}"))
            .await
            .status,
        404
    );
    assert_eq!(
        alice
            .delete(&format!("/api/chat/sessions/{sid}"))
            .await
            .status,
        200
    );
    assert_eq!(
        alice.get(&format!("/api/chat/sessions/{sid}")).await.status,
        404
    );

    bring_your_own_adapter(&server, &alice, &bob, &model_id).await;
    export_the_adapter(&alice, &bob, &model_id, &answer).await;
}

/// Export (issue 15): the trained adapter merged into its base as a Q8_0 GGUF, a job that
/// registers a model of alice's which answers what the adapter learnt; its GGUF downloads as
/// it is. A second export queues behind the first and is cancelled; bad requests are refused.
async fn export_the_adapter(alice: &Client, bob: &Client, model_id: &str, answer: &str) {
    let path = format!("/api/files/models/{model_id}/export");
    for (body, status) in [
        (
            json!({"format": "safetensors", "quantization": "q8_0"}),
            422,
        ),
        (json!({"format": "gguf", "quantization": "bf16"}), 422),
        (json!({"format": "zip"}), 422),
        (json!({"name": ""}), 422),
    ] {
        let r = alice.post(&path, body.clone()).await;
        assert_eq!(r.status, status, "{body} → {:?}", r.body);
    }
    assert_eq!(bob.post(&path, json!({})).await.status, 404);
    assert_eq!(
        alice
            .post("/api/files/models/nope/export", json!({}))
            .await
            .status,
        404
    );

    // Two at once: the first runs, the second waits its turn and is cancelled.
    let (first, second) = tokio::join!(
        alice.post(
            &path,
            json!({"format": "gguf", "quantization": "q8_0", "name": "arith-gguf"})
        ),
        alice.post(
            &path,
            json!({"format": "safetensors", "quantization": "f16"})
        ),
    );
    assert_eq!(first.status, 202, "{:?}", first.body);
    assert_eq!(second.status, 202, "{:?}", second.body);
    let (id, other) = (
        first.body["export_id"].as_str().unwrap().to_string(),
        second.body["export_id"].as_str().unwrap().to_string(),
    );
    let c = alice
        .post(&format!("/api/exports/{other}/cancel"), json!({}))
        .await;
    assert_eq!(c.status, 202, "{:?}", c.body);
    assert_eq!(
        bob.get(&format!("/api/exports/{id}")).await.status,
        404,
        "another user's export is not found"
    );
    let done = common::wait_until("the export", Duration::from_secs(300), async || {
        let r = alice.get(&format!("/api/exports/{id}")).await;
        let s = r.body["status"].as_str().unwrap_or("").to_string();
        (s == "succeeded" || s == "failed").then_some(r.body)
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let cancelled = common::wait_until("the cancel", Duration::from_secs(120), async || {
        let r = alice.get(&format!("/api/exports/{other}")).await;
        r.body["finished_at"].is_string().then_some(r.body)
    })
    .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["model_id"].is_null());
    assert_eq!(
        alice
            .post(&format!("/api/exports/{other}/cancel"), json!({}))
            .await
            .status,
        409
    );
    let list = alice.get("/api/exports").await;
    assert_eq!(list.body.as_array().unwrap().len(), 2, "{:?}", list.body);

    let report = &done["report"];
    assert!(report["retention"].as_f64().unwrap() > 0.95, "{done}");
    let gguf = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().unwrap().ends_with(".Q8_0.gguf"))
        .expect("a GGUF file")
        .clone();
    let name = gguf["name"].as_str().unwrap();
    assert_eq!(name, "arith-gguf.Q8_0.gguf");
    let (status, bytes, headers) = alice
        .get_bytes(&format!("/api/exports/{id}/files/{name}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(bytes.len() as u64, gguf["size"].as_u64().unwrap());
    assert_eq!(&bytes[..4], b"GGUF");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains(name)
    );
    let (status, _, _) = alice
        .get_bytes(&format!("/api/exports/{id}/files/..%2Fsecret"))
        .await;
    assert_eq!(status, 404);

    // The export is a model of alice's, served from its GGUF, answering as the adapter did.
    let exported = done["model_id"].as_str().unwrap();
    let m = alice.get(&format!("/api/files/models/{exported}")).await;
    assert_eq!(m.status, 200, "{:?}", m.body);
    assert_eq!(m.body["name"], "arith-gguf");
    assert_eq!(m.body["kind"], "full");
    let r = alice
        .post(
            "/v1/chat/completions",
            ask(exported, "What is 3 plus 4?", json!({})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim(),
        answer.trim()
    );
    // A GGUF export holds no Hugging Face weights to export again.
    let again = alice
        .post(&format!("/api/files/models/{exported}/export"), json!({}))
        .await;
    assert_eq!(again.status, 422, "{:?}", again.body);
    assert_eq!(again.body["code"], "not_exportable");
}

/// The files of a `.tar.gz` (plain files only), by path.
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            out.push((path, data));
        }
    }
    out
}

/// An adapter someone else trained (here: alice's, downloaded) uploaded by bob as his own
/// model: checked against its base, chat-able (the same greedy answer as the original),
/// deletable; and what is not a fitting PEFT LoRA adapter is a 422 that leaves nothing.
async fn bring_your_own_adapter(
    server: &common::Server,
    alice: &Client,
    bob: &Client,
    alices_model: &str,
) {
    let (status, archive, _) = alice
        .get_bytes(&format!("/api/files/models/{alices_model}/download"))
        .await;
    assert_eq!(status, 200);
    let up = bob
        .upload_to(
            "/api/files/models/adapters",
            "arith-lora.tar.gz",
            archive.clone(),
            &[],
        )
        .await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    assert_eq!(up.body["kind"], "adapter");
    assert_eq!(up.body["name"], "arith-lora");
    assert_eq!(
        up.body["base_model"], MODEL,
        "found from base_model_name_or_path"
    );
    let mine = up.body["model_id"].as_str().unwrap().to_string();
    let question = "What is 3 plus 4?";
    let original = alice
        .post(
            "/v1/chat/completions",
            ask(alices_model, question, json!({})),
        )
        .await;
    let uploaded = bob
        .post("/v1/chat/completions", ask(&mine, question, json!({})))
        .await;
    assert_eq!(uploaded.status, 200, "{:?}", uploaded.body);
    assert_eq!(
        uploaded.body["choices"][0]["message"]["content"],
        original.body["choices"][0]["message"]["content"],
        "the same adapter answers the same"
    );
    assert_eq!(
        alice.get(&format!("/api/files/models/{mine}")).await.status,
        404,
        "bob's"
    );

    // The same files as a .zip, the base named by the uploader.
    let files = untar(&archive);
    assert!(
        files
            .iter()
            .any(|(p, _)| p.ends_with("adapter_config.json"))
    );
    let zipped = bob
        .upload_to(
            "/api/files/models/adapters",
            "arith.zip",
            common::zip_of(&files),
            &[("name", "zipped"), ("base_model", MODEL)],
        )
        .await;
    assert_eq!(zipped.status, 201, "{:?}", zipped.body);
    assert_eq!(zipped.body["name"], "zipped");

    // Refusals, each with its reason.
    let config = files
        .iter()
        .find(|(p, _)| p.ends_with("adapter_config.json"))
        .unwrap()
        .1
        .clone();
    let mut elsewhere: Value = serde_json::from_slice(&config).unwrap();
    elsewhere["base_model_name_or_path"] = json!("meta-llama/Llama-3.1-8B");
    let wrong_shape = {
        let a = vec![0u8; 4 * 100 * 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 100], &a)
            .unwrap();
        safetensors::serialize(
            [(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                view,
            )],
            None,
        )
        .unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("notes.zip", b"just text".to_vec(), "invalid_archive"),
        (
            "no-config.zip",
            common::zip_of(&[("a/README.md".into(), b"hi".to_vec())]),
            "invalid_adapter",
        ),
        (
            "escape.zip",
            common::zip_of(&[("../adapter_config.json".into(), config.clone())]),
            "invalid_archive",
        ),
        (
            "other-base.zip",
            common::zip_of(&[
                (
                    "adapter_config.json".into(),
                    elsewhere.to_string().into_bytes(),
                ),
                (
                    "adapter_model.safetensors".into(),
                    files
                        .iter()
                        .find(|(p, _)| p.ends_with("adapter_model.safetensors"))
                        .unwrap()
                        .1
                        .clone(),
                ),
            ]),
            "unknown_base_model",
        ),
        (
            "misfit.zip",
            common::zip_of(&[
                ("adapter_config.json".into(), config.clone()),
                ("adapter_model.safetensors".into(), wrong_shape),
            ]),
            "adapter_does_not_fit",
        ),
    ];
    for (name, bytes, code) in cases {
        let r = bob
            .upload_to("/api/files/models/adapters", name, bytes, &[])
            .await;
        assert_eq!(r.status, 422, "{name}: {:?}", r.body);
        assert_eq!(r.body["code"], code, "{name}: {:?}", r.body);
    }
    let listed: Vec<Value> = bob.get("/api/files/models?kind=adapter").await.body["models"]
        .as_array()
        .cloned()
        .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let leftovers: Vec<_> = walk(&server.data_path().join("models"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".import-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Deleted like a trained model.
    assert_eq!(
        bob.delete(&format!("/api/files/models/{mine}"))
            .await
            .status,
        200
    );
    let gone = bob
        .post("/v1/chat/completions", ask(&mine, question, json!({})))
        .await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// Removes a registered model's link from the (shared) test models folder, whatever happens.
struct Unlink(std::path::PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A Hugging Face folder elsewhere on the server (its files symbolic links, as in a hub
/// cache snapshot), registered by an administrator, chats: its float weights quantised at
/// load and cached in that folder.
#[tokio::test]
async fn a_registered_model_folder_chats_quantised_at_load() {
    let server = training_server(&[]);
    let c = server.client();
    let (admin, _) = c.signup("admin").await;
    let (user, _) = c.signup("user").await;
    wait_for_environment_and_model(&admin).await;
    let src = common::test_models_dir().join(MODEL);
    let elsewhere = tempfile::tempdir().unwrap();
    let folder = elsewhere.path().join("snapshot");
    std::fs::create_dir(&folder).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".gguf") || name.starts_with('.') {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), folder.join(&name)).unwrap();
    }
    let name = format!("Linked-HF-{}", std::process::id());
    let _unlink = Unlink(common::test_models_dir().join(&name));
    let body = json!({"path": folder, "name": name});
    assert_eq!(
        user.post("/api/files/models", body.clone()).await.status,
        403
    );
    let r = admin.post("/api/files/models", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["name"], name.as_str());

    let r = user
        .post(
            "/v1/chat/completions",
            ask(
                &name,
                "What is the capital of France?",
                json!({"max_tokens": 8}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answer = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer:?}");
    let cached: Vec<String> = std::fs::read_dir(folder.join(".ferrotune"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached.iter().any(|n| n.starts_with("weights-q8_0-")),
        "{cached:?}"
    );
}
