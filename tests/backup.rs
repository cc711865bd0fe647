//! Backup and restore, end to end with the real binary: a data dir of a few hundred records
//! (users, datasets with their files, tasks with their folders, models with their files,
//! conversations, templates, API keys, loss curves), backed up offline and from a running
//! server under concurrent writes, restored into fresh data dirs, and compared record by
//! record and file by file. Damaged archives and non-empty targets are refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, wait_until};
use ferrotune::store::{
    ApiKey, ChatSession, DatasetRecord, MetricPoint, ModelKind, ModelRecord, Role, Snapshot, Store,
    TaskRecord, TaskStatus, TaskTemplate, User, new_id,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

const ADMIN_PASSWORD: &str = "admin-password-for-backups";

fn bin() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.env_remove("FERROTUNE_CONFIG")
        .env_remove("FERROTUNE_TOKEN")
        .env("RUST_LOG", "warn");
    c
}

/// Runs the binary; returns (success, stdout + stderr, seconds).
async fn ferrotune(args: &[&str]) -> (bool, String, f64) {
    let started = Instant::now();
    let out = bin().args(args).output().await.expect("run ferrotune");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed().as_secs_f64())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Fills `data_dir` with an administrator and `users` users, each with two datasets (files),
/// a task (its folder; the first user's is running with `running_pid`, the others completed
/// with a model), a conversation, a template, an API key and a loss curve. Returns the running
/// task's id.
async fn seed(data_dir: &Path, users: usize, running_pid: u32) -> String {
    std::fs::create_dir_all(data_dir).unwrap();
    let store = Store::open(&data_dir.join("store")).unwrap();
    std::fs::write(data_dir.join("jwt_secret"), "s".repeat(48)).unwrap();
    let pool = ferrotune::auth::passwords::PasswordPool::new(1, 4).unwrap();
    let hash = pool.hash(ADMIN_PASSWORD).await.unwrap();
    store
        .create_user(
            User::new("admin".into(), "admin@example.com".into(), hash),
            Some(Role::Admin),
        )
        .await
        .unwrap();
    let spec: ferrotune::training::spec::TaskRequest =
        serde_json::from_value(json!({"name": "t", "model_name": "m", "dataset_id": "x"})).unwrap();
    let spec = serde_json::to_value(spec.into_spec().unwrap()).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut running = String::new();
    for u in 0..users {
        let user = store
            .create_user(
                User::new(
                    format!("user{u}"),
                    format!("user{u}@example.com"),
                    "x".into(),
                ),
                Some(Role::User),
            )
            .await
            .unwrap();
        let owner = user.user_id.clone();
        let mut first_dataset = None;
        for d in 0..2 {
            let id = new_id();
            let dir = data_dir.join("datasets").join(&owner);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{id}.json"));
            let body = format!(r#"[{{"instruction": "q{u}-{d}", "output": "a{u}"}}]"#);
            std::fs::write(&path, &body).unwrap();
            let rec = DatasetRecord {
                file_id: id.clone(),
                owner: owner.clone(),
                filename: format!("d{d}.json"),
                file_path: s(&path).into(),
                size: body.len() as u64,
                format: "alpaca".into(),
                container: "json".into(),
                kind: "sft".into(),
                num_rows: 1,
                columns: vec!["instruction".into(), "output".into()],
                created_at: now,
            };
            store.datasets().put(&rec).await.unwrap();
            first_dataset.get_or_insert((id, path));
        }
        let (dataset_id, dataset_path) = first_dataset.unwrap();
        let task_id = new_id();
        let task_dir = data_dir.join("tasks").join(&task_id);
        let output = task_dir.join("output");
        std::fs::create_dir_all(output.join("checkpoint-2")).unwrap();
        std::fs::write(task_dir.join("train.log"), format!("step 1 of task {u}\n")).unwrap();
        std::fs::write(task_dir.join("events.jsonl"), "{\"id\":1}\n").unwrap();
        std::fs::write(
            output.join("checkpoint-2/adapter_model.safetensors"),
            vec![u as u8; 4096],
        )
        .unwrap();
        let is_running = u == 0;
        let paths = ferrotune::training::spec::RunPaths {
            model_dir: "/models/m".into(),
            dataset_file: s(&dataset_path).into(),
            dataset_format: ferrotune::datasets::format::DatasetFormat::Alpaca,
            dataset_kind: Default::default(),
            dataset_container: ferrotune::datasets::format::Container::Json,
            dataset_columns: vec!["instruction".into(), "output".into()],
            task_dir: s(&task_dir).into(),
            output_dir: s(&output).into(),
            validation: None,
        };
        let mut model_id = None;
        if !is_running {
            let id = new_id();
            let dir = data_dir.join("models").join(&owner).join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("adapter_config.json"), "{\"r\": 4}").unwrap();
            std::fs::write(dir.join("adapter_model.safetensors"), vec![7u8; 8192]).unwrap();
            store
                .models()
                .put(&ModelRecord {
                    model_id: id.clone(),
                    owner: owner.clone(),
                    name: format!("model{u}"),
                    model_path: s(&dir).into(),
                    kind: ModelKind::Adapter,
                    base_model: "m".into(),
                    task_id: Some(task_id.clone()),
                    size: 8192,
                    created_at: now,
                    template: None,
                    system: None,
                })
                .await
                .unwrap();
            model_id = Some(id);
        } else {
            running = task_id.clone();
        }
        store
            .tasks()
            .put(&TaskRecord {
                task_id: task_id.clone(),
                owner: owner.clone(),
                spec: spec.clone(),
                dataset_id: Some(dataset_id),
                paths: serde_json::to_value(&paths).unwrap(),
                status: if is_running {
                    TaskStatus::Running
                } else {
                    TaskStatus::Completed
                },
                progress: Default::default(),
                error: None,
                diagnosis: None,
                model_id,
                pid: is_running.then_some(running_pid),
                gpu_ids: vec![],
                resume_from: None,
                outputs_removed: false,
                eval_metrics: None,
                job: None,
                created_at: now,
                updated_at: now,
                started_at: Some(now),
                finished_at: (!is_running).then_some(now),
            })
            .await
            .unwrap();
        for step in 1..=5 {
            let point = MetricPoint {
                step,
                loss: Some(2.0 / step as f64),
                learning_rate: Some(1e-3),
                epoch: step as f64 / 5.0,
                t: step as f64,
                extra: Default::default(),
            };
            store.add_metric(&task_id, &point).await.unwrap();
        }
        store
            .chat_sessions()
            .put(&ChatSession {
                session_id: new_id(),
                owner: owner.clone(),
                title: format!("chat {u}"),
                model: Some("m".into()),
                messages: vec![],
                created_at: now,
                updated_at: now,
            })
            .await
            .unwrap();
        let mut settings = serde_json::Map::new();
        settings.insert("epochs".into(), json!(2));
        store
            .task_templates()
            .put(&TaskTemplate {
                template_id: new_id(),
                owner: owner.clone(),
                name: format!("template {u}"),
                settings,
                created_at: now,
            })
            .await
            .unwrap();
        let key = ApiKey {
            key_id: new_id(),
            owner: owner.clone(),
            name: "k".into(),
            prefix: "ft-abc".into(),
            secret_hash: vec![u as u8; 32],
            created_at: now,
        };
        store.create_api_key(&key, &key.secret_hash).await.unwrap();
    }
    store.flush().await.unwrap();
    running
}

/// The data dir's files a backup covers (not the store, `tmp/`, `cache/`), by relative path.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && ["store", "tmp", "cache"].contains(&name.as_str()) {
                continue;
            }
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &rel, out);
            } else {
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, "", &mut out);
    out
}

async fn snapshot_of(data_dir: &Path) -> Snapshot {
    let store = Store::open(&data_dir.join("store")).unwrap();
    store.snapshot().await.unwrap()
}

/// What a restore into `to` should hold for a record of `from`: its paths moved, a running
/// task without its process id. Non-JSON values (indexes) are kept byte for byte.
fn expected(tree: &str, value: &[u8], from: &Path, to: &Path) -> Result<Value, Vec<u8>> {
    let text = String::from_utf8(value.to_vec()).map_err(|_| value.to_vec())?;
    let moved = text.replace(&format!("\"{}/", s(from)), &format!("\"{}/", s(to)));
    match serde_json::from_str::<Value>(&moved) {
        Ok(mut v) if v.is_object() => {
            if tree == "tasks" && v["status"] == "running" {
                v["pid"] = Value::Null;
            }
            Ok(v)
        }
        _ => Err(value.to_vec()),
    }
}

/// Every record of `want` (from `from`) is in `got` (restored into `to`) as a restore writes
/// it; with `exact`, nothing else is.
fn assert_records(want: &Snapshot, got: &Snapshot, from: &Path, to: &Path, exact: bool) -> usize {
    let mut n = 0;
    for (tree, entries) in &want.trees {
        let restored: BTreeMap<&[u8], &[u8]> = got
            .trees
            .get(tree)
            .map(|e| {
                e.iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect()
            })
            .unwrap_or_default();
        if exact {
            assert_eq!(restored.len(), entries.len(), "tree {tree}: record count");
        }
        for (k, v) in entries {
            let r = restored.get(k.as_slice()).unwrap_or_else(|| {
                panic!("tree {tree}: key {:?} missing", String::from_utf8_lossy(k))
            });
            match expected(tree, v, from, to) {
                Ok(json) => assert_eq!(
                    serde_json::from_slice::<Value>(r).expect("JSON record"),
                    json,
                    "tree {tree}"
                ),
                Err(bytes) => assert_eq!(*r, bytes.as_slice(), "tree {tree}"),
            }
            n += 1;
        }
    }
    n
}

/// Indexes and the records they name agree (nothing half-written in a snapshot).
fn assert_consistent(snap: &Snapshot) {
    let tree = |n: &str| -> BTreeMap<Vec<u8>, Vec<u8>> {
        snap.trees
            .get(n)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    let users = tree("users");
    let by_name = tree("users_by_name");
    let by_email = tree("users_by_email");
    assert_eq!(users.len(), by_name.len());
    assert_eq!(users.len(), by_email.len());
    for (id, v) in &users {
        let u: Value = serde_json::from_slice(v).unwrap();
        let name = u["username"].as_str().unwrap().to_lowercase();
        assert_eq!(by_name.get(name.as_bytes()), Some(id));
    }
    for owned in [
        "datasets",
        "tasks",
        "models",
        "chat_sessions",
        "task_templates",
        "api_keys",
    ] {
        let records = tree(owned);
        let ids = tree(&format!("{owned}.ids"));
        assert_eq!(records.len(), ids.len(), "{owned}: records and ids");
        for (id, owner) in &ids {
            let mut key = owner.clone();
            key.push(0);
            key.extend_from_slice(id);
            assert!(records.contains_key(&key), "{owned}: id without record");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backup_restores_every_record_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    seed(&data, 30, 4_000_000).await;
    let archive = tmp.path().join("backup.tar.gz");

    let (ok, out, backup_s) =
        ferrotune(&["backup", "--data-dir", s(&data), "--to", s(&archive)]).await;
    assert!(ok, "{out}");
    let restored = tmp.path().join("elsewhere").join("restored");
    let (ok, out2, restore_s) =
        ferrotune(&["restore", s(&archive), "--data-dir", s(&restored)]).await;
    assert!(ok, "{out2}");
    assert!(out2.contains("1 task(s) were running"), "{out2}");

    let want = snapshot_of(&data).await;
    let got = snapshot_of(&restored).await;
    let n = assert_records(&want, &got, &data, &restored, true);
    let files = files_of(&data);
    assert_eq!(files, files_of(&restored), "every file, byte for byte");
    eprintln!(
        "offline: {n} store entries ({} records outside indexes), {} files, archive {} bytes: \
         backup {backup_s:.2} s, restore {restore_s:.2} s (wall time of the CLI)\n{out}{out2}",
        [
            "users",
            "datasets",
            "tasks",
            "models",
            "chat_sessions",
            "task_templates",
            "api_keys",
            "task_metrics"
        ]
        .iter()
        .map(|t| want.trees.get(*t).map_or(0, Vec::len))
        .sum::<usize>(),
        files.len(),
        std::fs::metadata(&archive).unwrap().len()
    );

    // A non-empty target is refused and left as it was.
    let before = files_of(&restored);
    let (ok, out, _) = ferrotune(&["restore", s(&archive), "--data-dir", s(&restored)]).await;
    assert!(!ok && out.contains("not empty"), "{out}");
    assert_eq!(before, files_of(&restored));

    // A damaged archive is refused, and nothing is left behind.
    let bytes = std::fs::read(&archive).unwrap();
    let truncated = tmp.path().join("truncated.tar.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let tampered = tmp.path().join("tampered.tar.gz");
    {
        use std::io::{Read, Write};
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        let needle = b"step 1 of task 7";
        let at = tar.windows(needle.len()).position(|w| w == needle).unwrap();
        tar[at] = b'S'; // same size, another content: only the checksum can tell
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        std::fs::write(&tampered, gz.finish().unwrap()).unwrap();
    }
    let parent = tmp.path().join("fresh");
    std::fs::create_dir_all(&parent).unwrap();
    for (bad, why) in [(&truncated, "damaged"), (&tampered, "checksum")] {
        let target = parent.join("data");
        let (ok, out, _) = ferrotune(&["restore", s(bad), "--data-dir", s(&target)]).await;
        assert!(!ok && out.contains(why), "{why}: {out}");
        assert!(!target.exists(), "nothing restored");
        assert_eq!(
            std::fs::read_dir(&parent).unwrap().count(),
            0,
            "no leftovers"
        );
    }
}

/// A stand-in worker process, ended with the test (also when it fails).
struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finds the object whose `task_id` is `id` anywhere in `v`.
fn find_task<'a>(v: &'a Value, id: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) if m.get("task_id").and_then(Value::as_str) == Some(id) => Some(v),
        Value::Object(m) => m.values().find_map(|x| find_task(x, id)),
        Value::Array(a) => a.iter().find_map(|x| find_task(x, id)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backup_under_writes_with_a_running_task() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A live process standing in for the running task's worker: the server re-attaches to
    // a process whose command line names the task.
    let running = seed(&data, 30, 0).await;
    let worker = Worker(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 600; true")
            .arg(&running)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    {
        let store = Store::open(&data.join("store")).unwrap();
        let owner = store
            .tasks()
            .get_any(&running)
            .await
            .unwrap()
            .unwrap()
            .owner;
        let pid = worker.0.id();
        store
            .tasks()
            .update(&owner, &running, move |t| {
                t.pid = Some(pid);
                true
            })
            .await
            .unwrap();
    }
    let seeded = snapshot_of(&data).await;

    let server = Server::start_at(&data, &[("FERROTUNE_REGISTER_MAX_PER_IP", "100000")]);
    let c = server.client();
    let login = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    let token = login.body["access_token"].as_str().unwrap().to_string();
    let admin = c.with_token(&token);
    let tasks = admin.get("/api/tasks?all=true").await;
    assert_eq!(
        find_task(&tasks.body, &running).map(|t| t["status"].clone()),
        Some(json!("running")),
        "the server took the task for running: {:?}",
        tasks.body
    );

    // Writes go on while the backup runs: registrations (three trees in one transaction) and
    // uploads (a file, then its record).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, admin, stop) = (c.clone(), admin.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .post(
                        "/api/auth/register",
                        json!({"username": format!("writer{n}"), "email": format!("writer{n}@example.com"), "password": "writer-password-123"}),
                    )
                    .await;
                assert_eq!(r.status, 201, "{:?}", r.body);
                let up = admin
                    .upload(&format!("w{n}.json"), common::arithmetic_dataset())
                    .await;
                assert_eq!(up.status, 201, "{:?}", up.body);
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let archive = tmp.path().join("online.tar.gz");
    // Without credentials the CLI says what to do.
    let (ok, out, _) = ferrotune(&["backup", "--data-dir", s(&data), "--to", s(&archive)]).await;
    assert!(
        !ok && out.contains("in use") && out.contains("--token"),
        "{out}"
    );
    let (ok, out, backup_s) = ferrotune(&[
        "backup",
        "--data-dir",
        s(&data),
        "--to",
        s(&archive),
        "--url",
        &server.base,
        "--token",
        &token,
    ])
    .await;
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0);

    // A user's own export: JSON records, no password hash.
    let (status, body, headers) = admin.get_bytes("/api/users/me/export").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/gzip");
    let mut names = BTreeSet::new();
    let mut profile = String::new();
    {
        use std::io::Read;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(body.as_slice()));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "profile.json" {
                e.read_to_string(&mut profile).unwrap();
            }
            names.insert(name);
        }
    }
    assert!(
        profile.contains("\"admin\"") && !profile.contains("password"),
        "{profile}"
    );
    for n in [
        "datasets.json",
        "tasks.json",
        "models.json",
        "api_keys.json",
        "chat_sessions.json",
    ] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
    assert!(
        names.iter().any(|n| n.starts_with("datasets/")),
        "dataset files: {names:?}"
    );

    drop(server);
    let restored = tmp.path().join("restored");
    let (ok, out2, restore_s) =
        ferrotune(&["restore", s(&archive), "--data-dir", s(&restored)]).await;
    assert!(ok, "{out2}");
    let got = snapshot_of(&restored).await;
    assert_consistent(&got);
    // Every seeded record is there as it was (the running task without its pid).
    let mut seeded_records = seeded.clone();
    seeded_records.trees.remove("meta");
    let n = assert_records(&seeded_records, &got, &data, &restored, false);
    // Every dataset record's file is there, byte for byte.
    let files = files_of(&restored);
    for (_, v) in got.trees.get("datasets").unwrap() {
        let d: Value = serde_json::from_slice(v).unwrap();
        let path = d["file_path"].as_str().unwrap();
        let rel = path.strip_prefix(&format!("{}/", s(&restored))).unwrap();
        assert_eq!(
            files.get(rel),
            Some(&std::fs::read(data.join(rel)).unwrap()),
            "{rel}"
        );
    }
    let users = got.trees["users"].len();
    eprintln!(
        "online: {} store entries ({n} seeded compared), {users} users ({written} registered \
         while writing), {} files: backup {backup_s:.2} s, restore {restore_s:.2} s\n{out}{out2}",
        got.trees.values().map(Vec::len).sum::<usize>(),
        files.len()
    );

    // The restored server: the running task is failed as interrupted; accounts work.
    let server = Server::start_at(&restored, &[]);
    let c = server.client();
    let login = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    let admin = c.with_token(login.body["access_token"].as_str().unwrap());
    let task = wait_until(
        "the interrupted task",
        Duration::from_secs(30),
        async || {
            let tasks = admin.get("/api/tasks?all=true").await;
            find_task(&tasks.body, &running)
                .filter(|t| t["status"] == "failed")
                .cloned()
        },
    )
    .await;
    let _ = task;
    let listed = admin.get("/api/admin/users").await;
    assert_eq!(listed.body["users"].as_array().unwrap().len(), users);
    drop(worker);
    drop(server);
    // Its record says why, and names no process.
    let store = Store::open(&restored.join("store")).unwrap();
    let task = store.tasks().get_any(&running).await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error.as_deref().unwrap_or("").contains("interrupted"),
        "{:?}",
        task.error
    );
    assert_eq!(task.pid, None);
}
