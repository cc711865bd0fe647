//! Training as a service, for real (LlamaFactory on CPU): the queue and its limits, live
//! events (SSE and WebSocket, late and resuming subscribers), cancel / resume, a server
//! killed mid-training, artifacts, and failures with their diagnosis.

mod common;

use std::time::{Duration, Instant};

use common::{
    MODEL, Reply, process_alive, sse, submit_task, training_server, upload_arithmetic,
    wait_for_environment_and_model, wait_status, wait_until, worker_pid,
};
use serde_json::{Value, json};

fn started(t: &Value) -> String {
    t["started_at"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn the_queue_follows_priority_and_per_user_limits() {
    let server = training_server(&[
        ("FERROTUNE_MAX_CONCURRENT_TASKS", "2"),
        ("FERROTUNE_MAX_RUNNING_PER_USER", "1"),
    ]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let (carol, _) = c.signup("carol").await;
    let (da, db, dc) = (
        upload_arithmetic(&alice).await,
        upload_arithmetic(&bob).await,
        upload_arithmetic(&carol).await,
    );
    wait_for_environment_and_model(&alice).await;

    let a1 = submit_task(&alice, &da, json!({"name": "a1", "max_steps": 5})).await;
    let a2 = submit_task(&alice, &da, json!({"name": "a2", "max_steps": 2})).await;
    let b1 = submit_task(&bob, &db, json!({"name": "b1", "max_steps": 2})).await;
    // Both slots go to alice's first task and bob's: alice's second waits for her first.
    wait_status(&alice, &a1, &["running"], Duration::from_secs(120)).await;
    wait_status(&bob, &b1, &["running"], Duration::from_secs(120)).await;
    let t = alice.get(&format!("/api/tasks/{a2}")).await.body;
    assert_eq!(t["status"], "queued", "one running task per user: {t}");
    assert_eq!(t["queue_position"], 1);

    // While both slots are busy: a higher priority goes first in the queue.
    let c1 = submit_task(
        &carol,
        &dc,
        json!({"name": "c1", "max_steps": 2, "priority": 5}),
    )
    .await;
    let b2 = submit_task(&bob, &db, json!({"name": "b2", "max_steps": 2})).await;
    let pos = |v: Value| v["queue_position"].as_u64();
    assert_eq!(
        pos(carol.get(&format!("/api/tasks/{c1}")).await.body),
        Some(1)
    );
    assert_eq!(
        pos(alice.get(&format!("/api/tasks/{a2}")).await.body),
        Some(2)
    );
    assert_eq!(
        pos(bob.get(&format!("/api/tasks/{b2}")).await.body),
        Some(3)
    );
    let listed = bob.get("/api/tasks").await.body;
    let b2_listed = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == b2.as_str())
        .cloned()
        .unwrap();
    assert_eq!(b2_listed["queue_position"], 3);

    // Bob moves his queued task to the front; a burst of changes leaves one of them, whole.
    let moves = futures_util::future::join_all((0..8).map(|i| {
        let bob = &bob;
        let b2 = &b2;
        async move {
            bob.post(
                &format!("/api/tasks/{b2}/priority"),
                json!({"priority": 10 + i % 2}),
            )
            .await
        }
    }))
    .await;
    for r in &moves {
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let t = bob.get(&format!("/api/tasks/{b2}")).await.body;
    assert!(matches!(t["priority"].as_i64(), Some(10 | 11)), "{t}");
    assert_eq!(t["queue_position"], 1, "{t}");
    assert_eq!(
        pos(alice.get(&format!("/api/tasks/{a2}")).await.body),
        Some(3)
    );
    for (who, id, body, status) in [
        (&bob, &b2, json!({"priority": 101}), 422),
        (&bob, &b2, json!({"priority": "high"}), 422),
        (&bob, &c1, json!({"priority": 50}), 404),
        (&alice, &a1, json!({"priority": 50}), 409),
    ] {
        let r = who
            .post(&format!("/api/tasks/{id}/priority"), body.clone())
            .await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }

    // The administrator (alice, the first account) oversees everyone's tasks; others do not.
    let all = alice.get("/api/tasks?all=true").await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    let owners: Vec<(String, String)> = all.body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["task_id"].as_str().unwrap().to_string(),
                t["owner"]["username"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (id, who) in [(&a1, "alice"), (&b2, "bob"), (&c1, "carol")] {
        assert!(owners.contains(&(id.clone(), who.into())), "{owners:?}");
    }
    assert_eq!(bob.get("/api/tasks?all=true").await.status, 403);
    assert_eq!(alice.get(&format!("/api/tasks/{b2}")).await.status, 200);
    assert_eq!(
        alice.get(&format!("/api/tasks/{c1}/logs")).await.status,
        200
    );
    assert_eq!(bob.get(&format!("/api/tasks/{c1}")).await.status, 404);
    // An administrator can stop someone else's queued task.
    let extra = submit_task(&carol, &dc, json!({"name": "c-extra", "max_steps": 2})).await;
    let r = alice
        .post(&format!("/api/tasks/{extra}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let t = carol.get(&format!("/api/tasks/{extra}")).await.body;
    assert_eq!(t["status"], "cancelled", "{t}");

    // Training templates: a task's settings kept under a name, new tasks started from them.
    let r = carol
        .post(
            "/api/templates",
            json!({"name": "Short LoRA", "task_id": c1}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let from_task = r.body["template_id"].as_str().unwrap().to_string();
    assert_eq!(r.body["settings"]["priority"], 5, "{:?}", r.body);
    assert!(
        r.body["settings"].get("dataset_id").is_none(),
        "{:?}",
        r.body
    );
    let r = carol
        .post(
            "/api/templates",
            json!({"name": "rank 16", "settings": {"lora_rank": 16, "max_steps": 1,
                   "lr_scheduler_type": "linear", "model_name": MODEL}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let rank16 = r.body["template_id"].as_str().unwrap().to_string();
    for (body, status) in [
        (json!({"name": "short lora", "settings": {}}), 409),
        (json!({"name": "bad", "settings": {"lora_rank": 0}}), 422),
        (json!({"name": "bad", "settings": {"bogus": 1}}), 422),
        (json!({"name": "both", "settings": {}, "task_id": c1}), 400),
        (json!({"name": "other's", "task_id": b2}), 404),
    ] {
        let r = carol.post("/api/templates", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }
    let listed = carol.get("/api/templates").await.body;
    let names: Vec<&str> = listed["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rank 16", "Short LoRA"]);
    assert_eq!(bob.get("/api/templates").await.body["templates"], json!([]));
    let r = carol
        .post(
            &format!("/api/templates/{rank16}/tasks"),
            json!({"name": "from template", "dataset_id": dc}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let started_from = r.body["task_id"].as_str().unwrap().to_string();
    let t = carol.get(&format!("/api/tasks/{started_from}")).await.body;
    assert_eq!(
        (&t["lora_rank"], &t["lr_scheduler_type"], &t["max_steps"]),
        (&json!(16), &json!("linear"), &json!(1)),
        "{t}"
    );
    let r = carol
        .post(&format!("/api/tasks/{started_from}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob
        .post(
            &format!("/api/templates/{rank16}/tasks"),
            json!({"name": "x", "dataset_id": db}),
        )
        .await;
    assert_eq!(r.status, 404, "another user's template: {:?}", r.body);
    assert_eq!(
        carol
            .delete(&format!("/api/templates/{from_task}"))
            .await
            .status,
        200
    );
    assert_eq!(
        carol
            .delete(&format!("/api/templates/{from_task}"))
            .await
            .status,
        404
    );
    // A burst of saves under one name keeps one; under distinct names keeps all; parallel
    // deletes remove each once.
    let same = futures_util::future::join_all((0..6).map(|_| {
        carol.post(
            "/api/templates",
            json!({"name": "Burst", "settings": {"lora_rank": 4}}),
        )
    }))
    .await;
    let mut codes: Vec<u16> = same.iter().map(|r| r.status).collect();
    codes.sort();
    let bodies = |rs: &[_]| {
        rs.iter()
            .map(|r: &Reply| r.body.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(codes, [201, 409, 409, 409, 409, 409], "{:?}", bodies(&same));
    let distinct = futures_util::future::join_all((0..6).map(|i| {
        carol.post(
            "/api/templates",
            json!({"name": format!("burst {i}"), "settings": {"lora_rank": 4}}),
        )
    }))
    .await;
    assert!(
        distinct.iter().all(|r| r.status == 201),
        "{:?}",
        bodies(&distinct)
    );
    let ids: Vec<String> = same
        .iter()
        .chain(&distinct)
        .filter_map(|r| r.body["template_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 7);
    let paths: Vec<String> = ids
        .iter()
        .chain(ids.iter())
        .map(|id| format!("/api/templates/{id}"))
        .collect();
    let deleted = futures_util::future::join_all(paths.iter().map(|p| carol.delete(p))).await;
    let mut codes: Vec<u16> = deleted.iter().map(|r| r.status).collect();
    codes.sort();
    assert_eq!(
        codes,
        [[200; 7], [404; 7]].concat(),
        "{:?}",
        bodies(&deleted)
    );
    assert_eq!(
        carol.get("/api/templates").await.body["templates"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let mut done = Vec::new();
    for (client, id) in [
        (&alice, &a1),
        (&alice, &a2),
        (&bob, &b1),
        (&bob, &b2),
        (&carol, &c1),
    ] {
        let t = wait_status(
            client,
            id,
            &["completed", "failed"],
            Duration::from_secs(900),
        )
        .await;
        assert_eq!(t["status"], "completed", "{t}");
        done.push(t);
    }
    let [a1t, a2t, _b1t, b2t, c1t] = <[Value; 5]>::try_from(done).unwrap();
    assert!(
        started(&c1t) < started(&a2t),
        "priority first: {} vs {}",
        started(&c1t),
        started(&a2t)
    );
    // (b2, moved to the front, starts as soon as bob's first task leaves him a slot.)
    let _ = b2t;
    assert!(
        started(&a2t).as_str() >= a1t["finished_at"].as_str().unwrap(),
        "alice's second waited for her first"
    );

    // Alice's two runs compared: both curves, what each reported at its end, and only the
    // parameters that differ (the name is shown apart).
    let cmp = alice
        .get(&format!("/api/tasks/compare?ids={a1},{a2}"))
        .await;
    assert_eq!(cmp.status, 200, "{:?}", cmp.body);
    let runs = cmp.body["tasks"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, (id, steps)) in runs.iter().zip([(&a1, 5), (&a2, 2)]) {
        assert_eq!(run["task_id"], id.as_str());
        assert_eq!(run["steps"], steps, "{run}");
        let points = run["points"].as_array().unwrap();
        assert_eq!(points.last().unwrap()["step"], steps, "{run}");
        assert!(run["final_loss"].as_f64().unwrap() > 0.0, "{run}");
        assert!(
            run["results"]["train_loss"].as_f64().unwrap() > 0.0,
            "{run}"
        );
    }
    let differences = cmp.body["differences"].as_array().unwrap();
    let max_steps = differences
        .iter()
        .find(|d| d["parameter"] == "max_steps")
        .unwrap_or_else(|| panic!("{differences:?}"));
    assert_eq!(max_steps["values"], json!([5, 2]));
    assert!(
        differences
            .iter()
            .all(|d| d["parameter"] != "name" && d["parameter"] != "learning_rate"),
        "{differences:?}"
    );
    // The same as CSV, one row per run.
    let (status, bytes, headers) = alice
        .get_bytes(&format!("/api/tasks/compare?ids={a1},{a2}&format=csv"))
        .await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("task_id,name,status,steps,final_loss,"),
        "{csv}"
    );
    assert!(lines[0].contains(",max_steps"), "{csv}");
    assert!(
        lines[1].starts_with(&format!("{a1},a1,completed,5,")),
        "{csv}"
    );
    // A burst of comparisons at once (JSON and CSV mixed) all answer, and alike.
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let alice = alice.clone();
            let path = if i % 2 == 0 {
                format!("/api/tasks/compare?ids={a1},{a2}")
            } else {
                format!("/api/tasks/compare?ids={a1},{a2}&format=csv")
            };
            tokio::spawn(async move { alice.get_bytes(&path).await })
        })
        .collect();
    for (i, h) in burst.into_iter().enumerate() {
        let (status, bytes, _) = h.await.unwrap();
        assert_eq!(status, 200, "request {i} of the burst");
        if i % 2 == 1 {
            assert_eq!(String::from_utf8(bytes).unwrap(), csv);
        } else {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["differences"], cmp.body["differences"]);
        }
    }
    // Someone else's run is not there to compare; an administrator sees everyone's.
    let r = bob.get(&format!("/api/tasks/compare?ids={b1},{a1}")).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = alice
        .get(&format!("/api/tasks/compare?ids={b1},{c1},{a2}"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for bad in [
        format!("ids={a1}"),
        format!("ids={a1},{a1}"),
        format!("ids={a1},{a2}&format=xml"),
        format!("ids={a1},{a2},{b1},{b2},{c1},{extra},{a1}"),
    ] {
        let r = alice.get(&format!("/api/tasks/compare?{bad}")).await;
        assert_eq!(r.status, 422, "{bad}: {:?}", r.body);
    }
}

fn latency_summary(mut lat: Vec<f64>) -> (f64, f64) {
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = lat[lat.len() / 2];
    let p99 = lat[((lat.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(lat.len() - 1)];
    (median, p99)
}

#[tokio::test]
async fn live_events_cancel_and_resume_from_the_checkpoint() {
    let server = training_server(&[("FERROTUNE_CANCEL_GRACE_SECS", "60")]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let ds = upload_arithmetic(&alice).await;
    wait_for_environment_and_model(&alice).await;

    let id = submit_task(&alice, &ds, json!({"max_steps": 12, "save_steps": 2})).await;
    let mut live = sse(&alice, &format!("/api/tasks/{id}/events"), None).await;
    let first = live.recv().await.unwrap();
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.data["task_id"], id.as_str());
    // The scheduler may start the task before this subscription: then the snapshot already
    // says `running`, and the stream goes on from there (its id covers that event).
    let started_before_subscribing = first.data["status"] == "running";
    let snapshot_id = first.id.expect("the snapshot carries the id it covers");
    assert_eq!(
        bob.get(&format!("/api/tasks/{id}/events")).await.status,
        404,
        "not bob's"
    );

    // A WebSocket subscriber sees the same stream.
    let ws_url = format!(
        "{}/api/tasks/{id}/ws",
        server.base.replace("http://", "ws://")
    );
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        ws_url.as_str(),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", alice.token.as_deref().unwrap())
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");
    let ws_events = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut out: Vec<Value> = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                let stop = v["event"] == "status" && v["data"]["status"] == "cancelled";
                out.push(v);
                if stop {
                    break;
                }
            }
        }
        out
    });

    // Run until step 3, with a dataset delete refused meanwhile.
    let mut events = Vec::new();
    let running = wait_until("step 3", Duration::from_secs(600), async || {
        while let Ok(e) = live.try_recv() {
            events.push(e);
        }
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        assert_ne!(t["status"], "failed", "{t}");
        (t["progress"]["current_step"].as_u64().unwrap_or(0) >= 3).then_some(t)
    })
    .await;
    let r = alice.delete(&format!("/api/files/datasets/{ds}")).await;
    assert_eq!(r.status, 409, "dataset in use: {:?}", r.body);
    assert_eq!(
        alice.delete(&format!("/api/tasks/{id}")).await.status,
        409,
        "no delete while running"
    );
    assert!(
        running.get("pid").is_none(),
        "answers do not show the worker's pid"
    );
    let pid = worker_pid(&alice, &id).await;
    assert!(process_alive(pid));

    let cancel_at = Instant::now();
    let r = alice
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let t = wait_status(
        &alice,
        &id,
        &["cancelled", "failed", "completed"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(t["status"], "cancelled", "{t}");
    wait_until(
        "the worker to be gone",
        Duration::from_secs(30),
        async || (!process_alive(pid)).then_some(Value::Null),
    )
    .await;
    let cancel_to_gone = cancel_at.elapsed();

    // Stop-and-save left a checkpoint at the step it stopped.
    let out = server.task_output(&t);
    let ckpt: u64 = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")
                .and_then(|n| n.parse().ok())
        })
        .max()
        .expect("a checkpoint");
    assert!(ckpt >= 3, "checkpoint at the stop: {ckpt}");

    // The live stream saw every step with increasing ids, then the status changes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events
        .iter()
        .any(|e| e.event == "status" && e.data["status"] == "cancelled")
        && Instant::now() < deadline
    {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(1), live.recv()).await {
            events.push(e);
        }
    }
    // Every event after the snapshot, once, in order: ids run on from the snapshot's.
    let ids: Vec<u64> = events.iter().filter_map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len(), "every event has an id");
    let expected: Vec<u64> = (snapshot_id + 1..snapshot_id + 1 + ids.len() as u64).collect();
    assert_eq!(ids, expected, "ids without gaps or repeats");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "step")
        .filter_map(|e| e.data["step"].as_u64())
        .collect();
    assert!(
        steps.len() >= 3 && steps.windows(2).all(|w| w[1] == w[0] + 1),
        "steps: {steps:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.event == "log" && e.data["loss"].is_number())
    );
    for s in ["running", "cancelling", "cancelled"] {
        assert!(
            events
                .iter()
                .any(|e| e.event == "status" && e.data["status"] == s)
                || (s == "running" && started_before_subscribing),
            "status {s}"
        );
    }
    let latencies: Vec<f64> = events
        .iter()
        .filter(|e| {
            matches!(
                e.event.as_str(),
                "step" | "log" | "checkpoint" | "heartbeat"
            )
        })
        .filter_map(|e| e.data["ts"].as_f64().map(|ts| (e.received - ts).max(0.0)))
        .collect();
    assert!(!latencies.is_empty());
    let (median, p99) = latency_summary(latencies.clone());
    assert!(p99 < 2.0, "events arrive within 2 s: p99 {p99:.3}");

    let ws_seen = ws_events.await.unwrap();
    assert_eq!(ws_seen[0]["event"], "snapshot");
    assert!(ws_seen.iter().any(|m| m["event"] == "step"));

    // A late subscriber starts from a snapshot that already says cancelled; one that
    // reconnects with Last-Event-ID gets exactly what came after.
    let mut late = sse(&alice, &format!("/api/tasks/{id}/events"), None).await;
    let snap = late.recv().await.unwrap();
    assert_eq!(snap.event, "snapshot");
    assert_eq!(snap.data["status"], "cancelled");
    let mut again = sse(&alice, &format!("/api/tasks/{id}/events"), Some(3)).await;
    let next = again.recv().await.unwrap();
    assert_eq!(next.id, Some(4), "{next:?}");

    // Resume continues from the checkpoint.
    let r = alice
        .post(&format!("/api/tasks/{id}/resume"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body["resume_from"]
            .as_str()
            .unwrap()
            .ends_with(&format!("checkpoint-{ckpt}"))
    );
    let last_before = *ids.last().unwrap();
    let t = wait_status(
        &alice,
        &id,
        &["completed", "failed"],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(t["status"], "completed", "{t}");
    let mut after = sse(
        &alice,
        &format!("/api/tasks/{id}/events"),
        Some(last_before),
    )
    .await;
    let mut resumed = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), after.recv()).await {
        resumed.push(e);
    }
    let begin = resumed
        .iter()
        .find(|e| e.event == "train_begin")
        .expect("train_begin after resume");
    assert_eq!(
        begin.data["start_step"], ckpt,
        "starts at the checkpoint's step"
    );
    let first_step = resumed
        .iter()
        .find(|e| e.event == "step")
        .expect("a step after resume");
    assert_eq!(first_step.data["step"], ckpt + 1);
    assert_eq!(t["progress"]["current_step"], 12);

    // Clone: same spec, overridable.
    let r = alice
        .post(
            &format!("/api/tasks/{id}/clone"),
            json!({"name": "again", "max_steps": 1}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let clone_id = r.body["task_id"].as_str().unwrap().to_string();
    let ct = alice.get(&format!("/api/tasks/{clone_id}")).await.body;
    assert_eq!(ct["name"], "again");
    assert_eq!(ct["max_steps"], 1);
    assert_eq!(ct["lora_rank"], 4, "the rest is copied");
    let r = alice
        .post(
            &format!("/api/tasks/{id}/clone"),
            json!({"learning_rate": 7}),
        )
        .await;
    assert_eq!(r.status, 422, "overrides are validated");
    wait_status(
        &alice,
        &clone_id,
        &["completed", "failed"],
        Duration::from_secs(600),
    )
    .await;

    eprintln!(
        "service report: event latency worker→SSE median {:.1} ms, p99 {:.1} ms over {} events; cancel→process gone {:.2} s",
        median * 1000.0,
        p99 * 1000.0,
        latencies.len(),
        cancel_to_gone.as_secs_f64()
    );
}

fn untar_names(bytes: &[u8]) -> Vec<String> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut archive = tar::Archive::new(gz);
    archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn a_server_killed_mid_training_reattaches_and_artifacts_download() {
    let mut server = training_server(&[]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let ds = upload_arithmetic(&alice).await;
    wait_for_environment_and_model(&alice).await;
    let id = submit_task(&alice, &ds, json!({"max_steps": 16, "save_steps": 4})).await;
    let running = wait_until("step 2", Duration::from_secs(600), async || {
        let t = alice.get(&format!("/api/tasks/{id}")).await.body;
        (t["progress"]["current_step"].as_u64().unwrap_or(0) >= 2).then_some(t)
    })
    .await;
    let _ = &running;
    let pid = worker_pid(&alice, &id).await;

    server.kill9();
    assert!(process_alive(pid), "the worker outlives the server");
    server.restart();
    let c = server.client();
    let alice = c.with_token(alice.token.as_deref().unwrap());
    let t = alice.get(&format!("/api/tasks/{id}")).await.body;
    assert!(
        matches!(t["status"].as_str(), Some("running" | "completed")),
        "re-attached, not stuck: {t}"
    );
    let t = wait_status(
        &alice,
        &id,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["progress"]["current_step"], 16);
    assert!(t["model_id"].is_string());

    for (name, must_have) in [
        ("adapter", "adapter/adapter_model.safetensors"),
        ("logs", "logs/train.log"),
        ("checkpoint-8", "checkpoint-8/trainer_state.json"),
    ] {
        let (status, bytes, headers) = alice
            .get_bytes(&format!("/api/tasks/{id}/artifacts/{name}"))
            .await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(headers.get("content-type").unwrap(), "application/gzip");
        let names = untar_names(&bytes);
        assert!(names.iter().any(|n| n == must_have), "{name}: {names:?}");
    }
    assert_eq!(
        alice
            .get(&format!("/api/tasks/{id}/artifacts/checkpoint-999"))
            .await
            .status,
        404
    );
    assert_eq!(
        alice
            .get(&format!("/api/tasks/{id}/artifacts/..%2F..%2Fetc"))
            .await
            .status,
        404
    );
    let bob = c.with_token(bob.token.as_deref().unwrap());
    assert_eq!(
        bob.get(&format!("/api/tasks/{id}/artifacts/adapter"))
            .await
            .status,
        404,
        "not bob's"
    );

    // Deleting the task removes its files; the registered model keeps its own.
    let model_id = t["model_id"].as_str().unwrap().to_string();
    let task_dir = server.data_path().join("tasks").join(&id);
    assert!(task_dir.is_dir());
    assert_eq!(alice.delete(&format!("/api/tasks/{id}")).await.status, 200);
    assert!(!task_dir.exists());
    assert_eq!(alice.get(&format!("/api/tasks/{id}")).await.status, 404);
    let m = alice.get(&format!("/api/files/models/{model_id}")).await;
    assert_eq!(m.status, 200);
    let model_path = server
        .data_path()
        .join(m.body["model_path"].as_str().unwrap());
    assert!(model_path.join("adapter_model.safetensors").is_file());
    // …and downloads without the task; only by its owner.
    let (status, bytes, headers) = alice
        .get_bytes(&format!("/api/files/models/{model_id}/download"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").unwrap(), "application/gzip");
    let names = untar_names(&bytes);
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("/adapter_model.safetensors")),
        "{names:?}"
    );
    assert_eq!(
        bob.get(&format!("/api/files/models/{model_id}/download"))
            .await
            .status,
        404
    );

    let res = alice.get("/api/system/resources").await.body;
    assert!(res["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(res["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(res["gpus"].is_array());
}

#[tokio::test]
async fn real_failures_get_a_diagnosis() {
    // A model folder that looks like a model but has no weights: LlamaFactory fails to load it.
    let dir = tempfile::tempdir().unwrap();
    let shared = common::test_models_dir();
    let server_models = dir.path().join("models");
    let broken = server_models.join("Broken-Model");
    std::fs::create_dir_all(&broken).unwrap();
    let server = common::Server::start_with(
        Some(&server_models),
        &[
            ("FERROTUNE_AUTO_SETUP", "true"),
            ("FERROTUNE_DEFAULT_MODEL", ""),
        ],
    );
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let ds = upload_arithmetic(&alice).await;
    wait_until("the environment", Duration::from_secs(1200), async || {
        let s = alice.get("/api/system/status").await.body;
        (s["environment"]["state"] == "ready").then_some(s)
    })
    .await;
    wait_until("the shared model", Duration::from_secs(600), async || {
        shared
            .join(MODEL)
            .join("model.safetensors")
            .is_file()
            .then_some(Value::Null)
    })
    .await;
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(shared.join(MODEL).join(f), broken.join(f)).unwrap();
    }
    let id = submit_task(
        &alice,
        &ds,
        json!({"model_name": "Broken-Model", "max_steps": 2}),
    )
    .await;
    let t = wait_status(
        &alice,
        &id,
        &["failed", "completed"],
        Duration::from_secs(600),
    )
    .await;
    assert_eq!(t["status"], "failed", "{t}");
    let diagnosis = t["diagnosis"].as_str().unwrap_or("");
    assert!(
        diagnosis.contains("base model could not be loaded"),
        "diagnosis: {diagnosis}\nerror: {}",
        t["error"]
    );
    let logs = alice
        .get(&format!("/api/tasks/{id}/logs?tail=50"))
        .await
        .body["logs"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!logs.is_empty(), "the failure's log lines are kept");
    // A failed task without a checkpoint cannot be resumed, but can be deleted.
    assert_eq!(
        alice
            .post(&format!("/api/tasks/{id}/resume"), json!({}))
            .await
            .status,
        409
    );
    assert_eq!(alice.delete(&format!("/api/tasks/{id}")).await.status, 200);
}
