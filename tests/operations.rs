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
