//! Models from a Hugging Face–compatible hub, against a hub on loopback (tests/common/hub.rs)
//! with the real client (huggingface_hub in the training environment): only the files a model
//! needs, checksums, resuming, tokens, errors; and through the server, a pulled model that
//! chats and trains.

mod common;
#[path = "common/hub.rs"]
mod hub_fixture;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{MODEL, Server, test_models_dir, training_server, upload_arithmetic, wait_until};
use ferrotune::models::hub::{self, HubError, HubRef, HubSettings, Progress};
use hub_fixture::{Content, Hub, Repo};
use serde_json::json;

/// The training environment's Python (huggingface_hub), installed if missing.
async fn python() -> PathBuf {
    let env = ferrotune::pyenv::PyEnv::locate(None);
    env.install(&|line: &str| eprintln!("setup: {line}"))
        .await
        .expect("training environment");
    env.python()
}

/// A small repository: a model's files, plus files a pull must not fetch.
fn tiny_repo(token: Option<&str>) -> Repo {
    let weights: Vec<u8> = (0..24_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut files = BTreeMap::new();
    for (name, bytes) in [
        (
            "config.json",
            br#"{"model_type": "llama", "hidden_size": 8}"#.to_vec(),
        ),
        (
            "tokenizer_config.json",
            br#"{"chat_template": "{{ messages }}"}"#.to_vec(),
        ),
        ("model.safetensors", weights),
        ("pytorch_model.bin", vec![7u8; 5000]),
        ("onnx/model.onnx", vec![1u8; 3000]),
        ("original/consolidated.safetensors", vec![2u8; 3000]),
        (".gitattributes", b"*.safetensors filter=lfs".to_vec()),
    ] {
        files.insert(name.to_string(), Content::Bytes(bytes));
    }
    Repo {
        files,
        token: token.map(str::to_string),
    }
}

fn settings(hub: &Hub, token: &str) -> HubSettings {
    HubSettings {
        endpoint: hub.base.clone(),
        token: token.to_string(),
    }
}

async fn pull(
    models: &Path,
    reference: &str,
    name: Option<&str>,
    s: &HubSettings,
) -> Result<ferrotune::models::BaseModel, HubError> {
    let py = python().await;
    hub::pull(
        models,
        &HubRef::parse(reference).unwrap(),
        name,
        &py,
        s,
        |p: Progress| eprintln!("{p:?}"),
    )
    .await
}

fn kind(e: &HubError) -> &str {
    match e {
        HubError::Hub { kind, .. } => kind,
        HubError::Taken(_) => "taken",
        HubError::Busy(_) => "busy",
        HubError::Invalid(_) => "invalid",
        HubError::Other(_) => "other",
    }
}

fn visible_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_hub_pull_fetches_only_the_model_checks_every_file_and_resumes() {
    let hub = Hub::start();
    let commit = hub.publish("test-org/tiny", tiny_repo(None));
    let models = tempfile::tempdir().unwrap();
    let s = settings(&hub, "");

    // A file that does not match the hub's checksum: the pull fails, no model appears.
    hub.corrupt("model.safetensors", true);
    let e = pull(models.path(), "test-org/tiny", None, &s)
        .await
        .expect_err("a corrupted file was accepted");
    assert_eq!(kind(&e), "checksum", "{e:#}");
    assert!(format!("{e}").contains("model.safetensors"), "{e}");
    assert!(visible_entries(models.path()).is_empty());
    assert!(
        ferrotune::models::list_base_models(models.path())
            .unwrap()
            .is_empty()
    );
    hub.corrupt("model.safetensors", false);

    // The connection drops 12 MB into the weights: the client resumes with a Range request
    // (from the last 10 MB it wrote), and the files completed before are not fetched again.
    hub.forget_seen();
    hub.cut_once("model.safetensors", 12_000_000);
    let m = pull(models.path(), "test-org/tiny", None, &s)
        .await
        .expect("the pull after a dropped connection");
    assert_eq!(m.name, "tiny");
    let seen = hub.seen();
    let weights_gets: Vec<_> = seen
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/model.safetensors"))
        .collect();
    assert!(
        weights_gets.iter().any(|r| r
            .range
            .as_deref()
            .is_some_and(|h| h.starts_with("bytes=10485760-"))),
        "no resumed request: {weights_gets:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with("/config.json")),
        "config.json was fetched again though complete: {seen:?}"
    );
    // Only what a model needs.
    let all = hub.seen();
    for unwanted in [
        "pytorch_model.bin",
        "model.onnx",
        "consolidated.safetensors",
        ".gitattributes",
    ] {
        assert!(
            !all.iter().any(|r| r.path.ends_with(unwanted)),
            "{unwanted} was requested"
        );
    }
    let dir = models.path().join("tiny");
    let mut landed = visible_entries(&dir);
    landed.sort();
    assert_eq!(
        landed,
        ["config.json", "model.safetensors", "tokenizer_config.json"]
    );
    let Content::Bytes(expected) = &tiny_repo(None).files["model.safetensors"] else {
        unreachable!()
    };
    assert_eq!(
        &std::fs::read(dir.join("model.safetensors")).unwrap(),
        expected
    );
    let source = hub::source_of(&dir).expect("source record");
    assert_eq!(source.repo, "test-org/tiny");
    assert_eq!(source.commit, commit);
    assert_eq!(visible_entries(models.path()), ["tiny"]);
    assert!(
        !models.path().join(".tiny.hub-partial").exists(),
        "the partial folder was left"
    );

    // Again: nothing to fetch. The same name from another repository: refused.
    hub.forget_seen();
    pull(models.path(), "test-org/tiny", None, &s)
        .await
        .unwrap();
    pull(models.path(), &format!("test-org/tiny@{commit}"), None, &s)
        .await
        .unwrap();
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());
    hub.publish("other-org/tiny", tiny_repo(None));
    let e = pull(models.path(), "other-org/tiny", None, &s)
        .await
        .expect_err("a taken name was overwritten");
    assert_eq!(kind(&e), "taken");
    pull(models.path(), "other-org/tiny", Some("tiny-2"), &s)
        .await
        .expect("under another name");

    // What the hub refuses comes back as the user's problem, in words.
    let e = pull(models.path(), "test-org/nothing", None, &s)
        .await
        .unwrap_err();
    assert_eq!(kind(&e), "not_found", "{e:#}");
    let e = pull(models.path(), "test-org/tiny@v9", Some("t9"), &s)
        .await
        .unwrap_err();
    assert_eq!(kind(&e), "revision", "{e:#}");
    let s_down = HubSettings {
        endpoint: "http://127.0.0.1:9".into(),
        token: String::new(),
    };
    let e = pull(models.path(), "test-org/tiny", Some("t-down"), &s_down)
        .await
        .unwrap_err();
    assert_eq!(kind(&e), "network", "{e:#}");
    assert_eq!(visible_entries(models.path()), ["tiny", "tiny-2"]);
}

#[tokio::test]
async fn a_gated_model_needs_the_token_and_the_token_stays_off_the_command_line() {
    let hub = Hub::start();
    hub.publish("gated-org/tiny", tiny_repo(Some("hf_secret_1")));
    let models = tempfile::tempdir().unwrap();
    let e = pull(models.path(), "gated-org/tiny", None, &settings(&hub, ""))
        .await
        .expect_err("a gated model without a token");
    assert_eq!(kind(&e), "gated", "{e:#}");
    assert!(format!("{e}").contains("token"), "{e}");
    let e = pull(
        models.path(),
        "gated-org/tiny",
        None,
        &settings(&hub, "hf_wrong"),
    )
    .await
    .unwrap_err();
    assert_eq!(kind(&e), "gated", "{e:#}");
    hub.forget_seen();
    pull(
        models.path(),
        "gated-org/tiny",
        None,
        &settings(&hub, "hf_secret_1"),
    )
    .await
    .expect("with the token");
    assert!(
        hub.seen()
            .iter()
            .filter(|r| r.path.contains("/resolve/"))
            .all(|r| r.authorized)
    );
    assert!(models.path().join("tiny/model.safetensors").is_file());
}

/// The SmolLM2 folder the shared test models dir holds, as a hub repository.
fn smollm2_repo(token: &str) -> Repo {
    let dir = test_models_dir().join(MODEL);
    let mut files = BTreeMap::new();
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.insert(name.to_string(), Content::Disk(dir.join(name)));
    }
    files.insert(
        "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        Content::Bytes(vec![0; 2048]),
    );
    Repo {
        files,
        token: Some(token.to_string()),
    }
}

#[tokio::test]
async fn a_model_pulled_from_the_hub_through_the_server_chats_and_trains() {
    // The shared models dir gets SmolLM2 (and the environment) if it lacks them.
    {
        let s = training_server(&[]);
        let (admin, _) = s.client().signup("admin").await;
        common::wait_for_environment_and_model(&admin).await;
    }
    let hub = Hub::start();
    hub.publish(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        smollm2_repo("hf_tok"),
    );
    let models = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        Some(models.path()),
        &[
            ("FERROTUNE_AUTO_SETUP", "true"),
            ("FERROTUNE_HUB_ENDPOINT", &hub.base),
            ("FERROTUNE_HUB_TOKEN", "hf_tok"),
            (
                "FERROTUNE_DEFAULT_MODEL",
                "HuggingFaceTB/SmolLM2-135M-Instruct",
            ),
        ],
    );
    let (admin, _) = s.client().signup("admin").await;
    let (user, _) = s.client().signup("user").await;

    // A hub id as the default model: pulled at first start.
    wait_until(
        "the default model from the hub",
        Duration::from_secs(300),
        async || {
            let st = admin.get("/api/system/status").await.body;
            assert_ne!(st["model_pull"]["state"], "failed", "{st:?}");
            (st["model_pull"]["state"] == "done").then_some(st)
        },
    )
    .await;
    assert!(
        models
            .path()
            .join(MODEL)
            .join("model.safetensors")
            .is_file()
    );

    // Administrators only; bad ids are 422s.
    let r = user
        .post(
            "/api/models/pulls",
            json!({"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    for bad in ["SmolLM2", "a/b/c", "org/../x", "org/n@a b"] {
        let r = admin.post("/api/models/pulls", json!({"repo": bad})).await;
        assert_eq!(r.status, 422, "{bad}: {:?}", r.body);
    }
    let r = admin
        .post(
            "/api/models/pulls",
            json!({"repo": "org/n", "nmae": "typo"}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);

    let r = admin
        .post(
            "/api/models/pulls",
            json!({"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": "smol-hub"}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    // A second pull of the same name while the first runs: 409.
    let again = admin
        .post(
            "/api/models/pulls",
            json!({"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": "smol-hub"}),
        )
        .await;
    assert!(
        again.status == 409 || again.status == 202,
        "{:?}",
        again.body
    );
    let done = wait_until("the hub pull", Duration::from_secs(300), async || {
        let p = admin.get(&format!("/api/models/pulls/{id}")).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        assert_ne!(p.body["state"], "failed", "{:?}", p.body);
        (p.body["state"] == "done").then_some(p.body)
    })
    .await;
    assert_eq!(done["files_total"], 6, "{done:?}");
    assert_eq!(done["files_done"], 6, "{done:?}");
    assert!(
        done["bytes_total"].as_u64().unwrap() > 500_000_000,
        "{done:?}"
    );
    assert!(
        !hub.seen().iter().any(|r| r.path.ends_with(".gguf")),
        "the GGUF was fetched although safetensors are there"
    );
    let list = admin.get("/api/models/pulls").await;
    assert_eq!(list.body["pulls"][0]["id"], id.as_str());
    let unknown = admin.get("/api/models/pulls/nope").await;
    assert_eq!(unknown.status, 404);

    // It is a base model everyone can chat with (quantised at load) ...
    let avail = user.get("/api/models/available").await;
    assert!(
        avail.body["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "smol-hub" || m["name"] == "smol-hub"),
        "{:?}",
        avail.body
    );
    let chat = user
        .post(
            "/v1/chat/completions",
            json!({"model": "smol-hub", "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
                   "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(chat.status, 200, "{:?}", chat.body);
    assert!(
        !chat.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );

    // ... and trains: a LoRA over it, which then chats.
    let dataset = upload_arithmetic(&user).await;
    let task = common::submit_task(
        &user,
        &dataset,
        json!({"model_name": "smol-hub", "batch_size": 8, "save_steps": 1000}),
    )
    .await;
    let t = common::wait_status(
        &user,
        &task,
        &["completed", "failed"],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(t["status"], "completed", "{t:?}");
    let model_id = t["model_id"].as_str().expect("model_id").to_string();
    let chat = user
        .post(
            "/v1/chat/completions",
            json!({"model": model_id, "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
                   "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(chat.status, 200, "{:?}", chat.body);

    // The same name again, from another repository: 409 at once.
    hub.publish("other/smol-hub", smollm2_repo("hf_tok"));
    let r = admin
        .post("/api/models/pulls", json!({"repo": "other/smol-hub"}))
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["code"], "name_taken");
}
