//! Operating the server: the audit log and webhooks, against the real binary over loopback.

mod common;

use common::Server;
use serde_json::{Value, json};

fn entries(v: &Value) -> Vec<Value> {
    v["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_audit_log_says_who_did_what_when_and_from_where() {
    let mut server = Server::start(&[]);
    let c = server.client();
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let alice_id = alice.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();

    let up = alice
        .upload("notes.jsonl", common::arithmetic_dataset())
        .await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    let ds = up.body["file_id"].as_str().unwrap().to_string();
    // Bob cannot delete it (not his): recorded as a failure, with Bob as the actor.
    let denied = bob.delete(&format!("/api/files/datasets/{ds}")).await;
    assert_eq!(denied.status, 404);
    // A wrong password: recorded with the name tried and no actor id.
    let bad = c
        .post(
            "/api/auth/login",
            json!({"username_or_email": "alice", "password": "not-her-password"}),
        )
        .await;
    assert_eq!(bad.status, 401);
    let key = alice.post("/api/keys", json!({"name": "laptop"})).await;
    assert_eq!(key.status, 201);
    let del = alice.delete(&format!("/api/files/datasets/{ds}")).await;
    assert_eq!(del.status, 200, "{:?}", del.body);
    let request_id = del.headers["x-request-id"].to_str().unwrap().to_string();

    // Who deleted this dataset, when, from where.
    let r = root
        .get(&format!("/api/audit?action=dataset.delete&target={ds}"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let found = entries(&r.body);
    assert_eq!(found.len(), 2, "{found:?}");
    let done = &found[0];
    assert_eq!(done["actor_name"], "alice");
    assert_eq!(done["actor_id"], alice_id.as_str());
    assert_eq!(done["outcome"], "success");
    assert_eq!(done["status"], 200);
    assert_eq!(done["client"], "127.0.0.1");
    assert_eq!(done["request_id"], request_id.as_str());
    assert_eq!(done["method"], "DELETE");
    let at = time::OffsetDateTime::parse(
        done["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!((time::OffsetDateTime::now_utc() - at).whole_seconds() < 60);
    assert_eq!(found[1]["actor_name"], "bob");
    assert_eq!(found[1]["outcome"], "failure");
    assert_eq!(found[1]["status"], 404);

    // The upload names the dataset it made; the key its id and name (never the secret).
    let up_entry = entries(&root.get("/api/audit?action=dataset.upload").await.body);
    assert_eq!(up_entry.len(), 1);
    assert_eq!(up_entry[0]["target_id"], ds.as_str());
    assert_eq!(up_entry[0]["detail"], "notes.jsonl");
    let key_entry = entries(&root.get("/api/audit?action=key.").await.body);
    assert_eq!(key_entry[0]["action"], "key.create");
    assert_eq!(
        key_entry[0]["target_id"],
        key.body["key_id"].as_str().unwrap()
    );
    assert!(
        !root
            .get("/api/audit")
            .await
            .body
            .to_string()
            .contains(key.body["key"].as_str().unwrap())
    );
    let failed = entries(
        &root
            .get("/api/audit?action=auth.login&outcome=denied")
            .await
            .body,
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["actor_name"], "alice");
    assert!(failed[0]["actor_id"].is_null());

    // An account change says what changed (not the new password).
    let bob_id = bob.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ch = root
        .patch(
            &format!("/api/admin/users/{bob_id}"),
            json!({"disabled": true, "password": "a-new-password-1"}),
        )
        .await;
    assert_eq!(ch.status, 200, "{:?}", ch.body);
    let upd = entries(&root.get("/api/audit?action=user.update").await.body);
    assert_eq!(upd[0]["target_id"], bob_id.as_str());
    assert_eq!(upd[0]["detail"], "disabled=true, password reset");
    assert_eq!(upd[0]["actor_name"], "root");
    assert!(
        !root
            .get("/api/audit")
            .await
            .body
            .to_string()
            .contains("a-new-password-1")
    );

    // Users see their own entries only; others' are refused.
    let own = entries(&alice.get("/api/audit?limit=1000").await.body);
    assert!(!own.is_empty());
    assert!(
        own.iter().all(|e| e["actor_id"] == alice_id.as_str()),
        "{own:?}"
    );
    let root_id = root.get("/api/auth/me").await.body["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        alice
            .get(&format!("/api/audit?actor={root_id}"))
            .await
            .status,
        403
    );
    // By default a webhook cannot point into the server's own network.
    for url in [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "http://localhost/x",
    ] {
        let r = alice.post("/api/webhooks", json!({"url": url})).await;
        assert_eq!(r.status, 422, "{url}: {:?}", r.body);
        assert!(r.error().contains("private"), "{:?}", r.body);
    }
    // Nothing edits or removes an entry.
    for r in [
        root.post("/api/audit", json!({})).await,
        root.delete("/api/audit").await,
        root.patch("/api/audit", json!({})).await,
    ] {
        assert_eq!(r.status, 405);
    }
    // Bad filters are named.
    let r = root.get("/api/audit?since=yesterday").await;
    assert_eq!(r.status, 422);
    assert!(r.error().contains("since"), "{:?}", r.body);
    assert_eq!(root.get("/api/audit?limit=0").await.status, 422);
    assert_eq!(root.get("/api/audit?outcome=maybe").await.status, 422);

    // A burst of parallel uploads: one entry each.
    let uploads = (0..12).map(|i| {
        let a = alice.clone();
        async move {
            a.upload(&format!("b{i}.jsonl"), common::arithmetic_dataset())
                .await
        }
    });
    let replies = futures_util::future::join_all(uploads).await;
    let made: std::collections::BTreeSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{:?}", r.body);
            r.body["file_id"].as_str().unwrap().to_string()
        })
        .collect();
    let logged: std::collections::BTreeSet<String> = entries(
        &root
            .get("/api/audit?action=dataset.upload&limit=1000")
            .await
            .body,
    )
    .iter()
    .filter_map(|e| e["target_id"].as_str().map(str::to_string))
    .filter(|id| *id != ds)
    .collect();
    assert_eq!(made, logged);

    // Paging: pages of 5 are disjoint, newest first, and together the whole log.
    let all = entries(&root.get("/api/audit?limit=1000").await.body);
    let mut paged = Vec::new();
    let mut before = String::new();
    loop {
        let page = root
            .get(&format!("/api/audit?limit=5&before={before}"))
            .await
            .body;
        paged.extend(entries(&page));
        match page["next"].as_str() {
            Some(n) => before = n.to_string(),
            None => break,
        }
    }
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&paged), ids(&all));
    assert!(all.len() > 20);

    // Entries are durable: the same after a restart.
    server.restart();
    let root = server.client().with_token(root.token.as_deref().unwrap());
    let again = entries(&root.get("/api/audit?limit=1000").await.body);
    assert_eq!(ids(&again), ids(&all));
}

/// The webhook's delivery log once it holds `n` attempts.
async fn attempts_logged(c: &common::Client, id: &str, n: usize) -> Value {
    common::wait_until(
        "the attempts",
        std::time::Duration::from_secs(10),
        async || {
            let d = c.get(&format!("/api/webhooks/{id}/deliveries")).await.body;
            (d["deliveries"].as_array().map_or(0, |v| v.len()) >= n).then_some(d)
        },
    )
    .await
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_logged() {
    let server = Server::start(&[
        ("FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true"),
        ("FERROTUNE_WEBHOOK_RETRY_BASE_MS", "200"),
        ("FERROTUNE_WEBHOOK_MAX_ATTEMPTS", "4"),
    ]);
    let c = server.client();
    let (alice, _) = c.signup("alice").await;
    let (bob, _) = c.signup("bob").await;
    let (base, seen) = common::receiver().await;

    // Bad settings are named.
    for (body, field) in [
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"url": "not a url"}), "url"),
        (
            json!({"url": format!("{base}/ok"), "events": ["task.exploded"]}),
            "events",
        ),
        (json!({"url": format!("{base}/ok"), "events": []}), "events"),
    ] {
        let r = alice.post("/api/webhooks", body).await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert!(r.error().contains(field), "{:?}", r.body);
    }
    assert_eq!(
        alice
            .post(
                "/api/webhooks",
                json!({"url": format!("{base}/ok"), "color": "red"})
            )
            .await
            .status,
        422
    );

    let made = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/ok"), "events": ["task.*"], "description": "ci"}),
        )
        .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let ok_id = made.body["webhook_id"].as_str().unwrap().to_string();
    let secret = made.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    // The secret is shown once.
    let listed = alice.get("/api/webhooks").await;
    assert_eq!(listed.body["webhooks"].as_array().unwrap().len(), 1);
    assert!(!listed.body.to_string().contains(&secret));
    assert!(
        listed.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "task.succeeded")
    );
    // Others cannot see, test or delete it.
    assert_eq!(bob.get(&format!("/api/webhooks/{ok_id}")).await.status, 404);
    assert_eq!(
        bob.post(&format!("/api/webhooks/{ok_id}/test"), json!({}))
            .await
            .status,
        404
    );
    assert_eq!(
        bob.delete(&format!("/api/webhooks/{ok_id}")).await.status,
        404
    );
    assert!(
        bob.get("/api/webhooks").await.body["webhooks"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A test event: delivered, signed, logged with the receiver's status.
    let t0 = std::time::Instant::now();
    let test = alice
        .post(&format!("/api/webhooks/{ok_id}/test"), json!({}))
        .await;
    assert_eq!(test.status, 200, "{:?}", test.body);
    assert_eq!(test.body["succeeded"], true, "{:?}", test.body);
    assert_eq!(test.body["status"], 204);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/ok");
    assert!(
        common::verify(&secret, &got[0]),
        "the signature verifies with the secret"
    );
    assert!(!common::verify(
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        &got[0]
    ));
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "webhook.test");
    assert_eq!(body["object"], "event");
    assert_eq!(body["id"], got[0].id.as_str());
    let ts: i64 = got[0].timestamp.parse().unwrap();
    assert!((ts - time::OffsetDateTime::now_utc().unix_timestamp()).abs() < 60);
    eprintln!(
        "test event delivered in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // A flaky receiver: two 500s, then taken; every attempt is in the log, one event id.
    let flaky = alice
        .post("/api/webhooks", json!({"url": format!("{base}/flaky")}))
        .await;
    let flaky_id = flaky.body["webhook_id"].as_str().unwrap().to_string();
    let first = alice
        .post(&format!("/api/webhooks/{flaky_id}/test"), json!({}))
        .await;
    assert_eq!(first.body["succeeded"], false);
    assert_eq!(first.body["status"], 500);
    assert!(first.body["next_attempt_at"].is_string());
    let log = attempts_logged(&alice, &flaky_id, 3).await;
    let attempts = log["deliveries"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(attempts[0]["attempt"], 3);
    assert_eq!(attempts[0]["succeeded"], true);
    assert_eq!(attempts[1]["status"], 500);
    assert_eq!(attempts[2]["attempt"], 1);
    let ids: std::collections::BTreeSet<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/flaky")
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(ids.len(), 1, "retries carry the event's id");
    // The backoff: 200 ms then 400 ms between attempts.
    let times: Vec<std::time::Instant> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/flaky")
        .map(|r| r.at)
        .collect();
    assert!(times[1] - times[0] >= std::time::Duration::from_millis(190));
    assert!(times[2] - times[1] >= std::time::Duration::from_millis(390));

    // A receiver that never takes it: the attempts run out (4), each logged as failed.
    let down = alice
        .post("/api/webhooks", json!({"url": format!("{base}/down")}))
        .await;
    let down_id = down.body["webhook_id"].as_str().unwrap().to_string();
    alice
        .post(&format!("/api/webhooks/{down_id}/test"), json!({}))
        .await;
    let log = attempts_logged(&alice, &down_id, 4).await;
    let attempts = log["deliveries"].as_array().unwrap();
    assert!(
        attempts
            .iter()
            .all(|a| a["succeeded"] == false && a["status"] == 503)
    );
    assert!(
        attempts[0]["next_attempt_at"].is_null(),
        "no attempt after the last"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    assert_eq!(
        alice
            .get(&format!("/api/webhooks/{down_id}/deliveries"))
            .await
            .body["deliveries"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Switched off: nothing is sent; deleted: gone with its log. Both audited.
    let off = alice
        .patch(&format!("/api/webhooks/{ok_id}"), json!({"active": false}))
        .await;
    assert_eq!(off.body["active"], false);
    assert_eq!(
        alice
            .delete(&format!("/api/webhooks/{down_id}"))
            .await
            .status,
        200
    );
    assert_eq!(
        alice
            .get(&format!("/api/webhooks/{down_id}/deliveries"))
            .await
            .status,
        404
    );
    let audit = alice.get("/api/audit?action=webhook.").await.body;
    let actions: Vec<String> = entries(&audit)
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        ["webhook.create", "webhook.update", "webhook.delete"]
            .iter()
            .all(|a| actions.iter().any(|x| x == a)),
        "{actions:?}"
    );
}

#[tokio::test]
async fn a_crossed_disk_line_raises_an_alert_and_fires_the_admin_webhook() {
    // Every disk has less than 100 % free: the line is crossed at the first check.
    let mut server = Server::start(&[
        ("FERROTUNE_ALERT_DISK_FREE_PERCENT", "100"),
        ("FERROTUNE_ALERT_MEMORY_PERCENT", "0"),
        ("FERROTUNE_ALERT_CHECK_SECS", "1"),
        ("FERROTUNE_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true"),
    ]);
    let c = server.client();
    let (root, _) = c.signup("root").await;
    let (alice, _) = c.signup("alice").await;
    let (base, seen) = common::receiver().await;
    let hook = root
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/ok"), "events": ["alert.*"]}),
        )
        .await;
    assert_eq!(hook.status, 201, "{:?}", hook.body);
    let secret = hook.body["secret"].as_str().unwrap().to_string();
    // A non-administrator's webhook asking for everything gets no server alerts.
    let theirs = alice
        .post(
            "/api/webhooks",
            json!({"url": format!("{base}/alice"), "events": ["*"]}),
        )
        .await;
    assert_eq!(theirs.status, 201);
    // The line was crossed at start, before these webhooks existed; a restart with them in
    // place (a server starting on a full disk) raises it again.
    server.restart();
    let alice = server.client().with_token(alice.token.as_deref().unwrap());

    let alerts = common::wait_until(
        "the disk alert",
        std::time::Duration::from_secs(10),
        async || {
            let a = alice.get("/api/system/alerts").await.body;
            (a["alerts"].as_array().is_some_and(|v| !v.is_empty())).then_some(a)
        },
    )
    .await;
    let disk = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "disk:data")
        .cloned()
        .expect("the data directory's disk");
    assert_eq!(disk["kind"], "disk_free");
    assert_eq!(disk["threshold"], 100.0);
    assert!(disk["value"].as_f64().unwrap() < 100.0);
    assert!(
        disk["message"].as_str().unwrap().contains("below 100 %"),
        "{disk}"
    );

    // The admin's webhook: alert.raised with the value and the line, signed; within a few
    // seconds (the check runs every second), once per alert.
    common::wait_until(
        "alert.raised at the webhook",
        std::time::Duration::from_secs(10),
        async || {
            let got = seen.lock().unwrap().clone();
            got.iter()
                .any(|r| r.path == "/ok" && r.body.contains("disk:data"))
                .then_some(Value::Null)
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let got = seen.lock().unwrap().clone();
    let raised: Vec<&common::Received> = got
        .iter()
        .filter(|r| r.path == "/ok" && r.body.contains("disk:data"))
        .collect();
    assert_eq!(raised.len(), 1, "raised once, not at every check");
    assert!(common::verify(&secret, raised[0]));
    let body: Value = serde_json::from_str(&raised[0].body).unwrap();
    assert_eq!(body["type"], "alert.raised");
    assert_eq!(body["data"]["threshold"], 100.0);
    assert!(
        got.iter().all(|r| r.path != "/alice"),
        "alerts go to administrators only"
    );
}
