//! Webhooks: each user's URLs that receive their notices (`task.succeeded`, `export.failed`,
//! …) as signed HTTP POSTs, server-side, whether or not a browser is open.
//!
//! The request follows [Standard Webhooks](https://www.standardwebhooks.com/) (the scheme
//! OpenAI's webhooks use): headers `webhook-id` (the event's id, the same on every retry),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}" keyed by the secret's bytes>`; the body is
//! `{"object": "event", "id", "type", "created_at", "data"}`. A receiver answering 2xx has
//! it; anything else (or no answer within the timeout) is retried after 1, 2, 4, … times
//! `webhook_retry_base_ms`, up to `webhook_max_attempts` attempts. Every attempt goes into the
//! webhook's delivery log (status, error, time, when the next one goes out). Retries wait in
//! memory: a restart drops the ones not yet sent (they are in the log as failed attempts
//! with a next time that never came).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::notify::{Notice, Notices};
use crate::store::{Store, WebhookDelivery, WebhookRecord, new_id};

/// The events a webhook may ask for.
pub const EVENTS: &[&str] = &[
    "task.queued",
    "task.started",
    "task.succeeded",
    "task.failed",
    "task.cancelled",
    "task.paused",
    "evaluation.queued",
    "evaluation.started",
    "evaluation.succeeded",
    "evaluation.failed",
    "evaluation.cancelled",
    "export.queued",
    "export.started",
    "export.succeeded",
    "export.failed",
    "export.cancelled",
    "alert.raised",
    "alert.resolved",
];

/// Deliveries kept per webhook.
const KEEP_DELIVERIES: usize = 200;
/// Webhooks per user.
const MAX_WEBHOOKS: usize = 20;

/// How deliveries are attempted.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub timeout: Duration,
    /// Deliver to loopback, private and link-local addresses too (off: such URLs are refused
    /// and host names that resolve only to them fail, so users cannot reach the server's own
    /// network through it).
    pub allow_private: bool,
}

pub struct Webhooks {
    store: Store,
    http: reqwest::Client,
    policy: Policy,
}

/// What a user sends to make or change a webhook.
#[derive(Debug, Default)]
pub struct Change {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub description: Option<String>,
    pub active: Option<bool>,
}

impl Webhooks {
    pub fn new(store: Store, policy: Policy) -> Result<Arc<Webhooks>> {
        let mut http = reqwest::Client::builder();
        if !policy.allow_private {
            // Resolved here, so a name cannot point at a private address after the check.
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        let http = http
            .timeout(policy.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferrotune-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal(format!("webhook client: {e}")))?;
        Ok(Arc::new(Webhooks {
            store,
            http,
            policy,
        }))
    }

    /// Delivers every notice to the webhooks of its owner that ask for it, until the
    /// process ends.
    pub fn spawn(self: &Arc<Self>, notices: &Notices) -> tokio::task::JoinHandle<()> {
        let mut rx = notices.subscribe();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(notice) => this.dispatch(&notice).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "webhooks fell behind: notices were dropped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    async fn dispatch(self: &Arc<Self>, notice: &Notice) {
        let hooks = match self.store.webhooks().list(&notice.owner).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, event = %notice.event, "could not read webhooks");
                return;
            }
        };
        for hook in hooks
            .into_iter()
            .filter(|h| h.active && subscribed(&h.events, &notice.event))
        {
            let this = self.clone();
            let event = Event::new(&notice.event, notice.data.clone());
            tokio::spawn(async move { this.deliver(hook, &event, None).await });
        }
    }

    /// Attempts `event` until the receiver takes it or the attempts run out; the first
    /// attempt's record goes to `first` (for "send a test event").
    async fn deliver(
        &self,
        hook: WebhookRecord,
        event: &Event,
        mut first: Option<tokio::sync::oneshot::Sender<WebhookDelivery>>,
    ) {
        let mut hook = hook;
        let max = self.policy.max_attempts.max(1);
        for attempt in 1..=max {
            let mut d = self.attempt(&hook, event, attempt).await;
            let wait = self
                .policy
                .retry_base
                .saturating_mul(2u32.saturating_pow(attempt - 1))
                .min(Duration::from_secs(3600));
            let again = !d.succeeded && attempt < max;
            if again {
                d.next_attempt_at = Some(OffsetDateTime::now_utc() + wait);
            }
            self.log(&d).await;
            if let Some(tx) = first.take() {
                let _ = tx.send(d);
            }
            if !again {
                return;
            }
            tokio::time::sleep(wait).await;
            // A webhook deleted or switched off meanwhile gets no more attempts; a changed URL
            // or secret is used from the next one.
            match self
                .store
                .webhooks()
                .get(&hook.owner, &hook.webhook_id)
                .await
            {
                Ok(Some(h)) if h.active => hook = h,
                _ => return,
            }
        }
    }

    async fn attempt(&self, hook: &WebhookRecord, event: &Event, attempt: u32) -> WebhookDelivery {
        let started = Instant::now();
        let at = OffsetDateTime::now_utc();
        let timestamp = at.unix_timestamp();
        let body = event.body.to_string();
        let signed = check_url(&hook.url, self.policy.allow_private)
            .map_err(|e| e.message)
            .and_then(|_| sign(&hook.secret, &event.id, timestamp, &body));
        let (status, error) = match signed {
            Err(e) => (None, Some(e)),
            Ok(signature) => {
                let sent = self
                    .http
                    .post(&hook.url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &event.id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", signature)
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(resp) => {
                        let s = resp.status();
                        let err = (!s.is_success()).then(|| format!("the receiver answered {s}"));
                        (Some(s.as_u16()), err)
                    }
                    Err(e) if e.is_timeout() => (
                        None,
                        Some(format!(
                            "no answer within {} s",
                            self.policy.timeout.as_secs_f64()
                        )),
                    ),
                    Err(e) => (None, Some(describe(&e))),
                }
            }
        };
        WebhookDelivery {
            delivery_id: new_id(),
            webhook_id: hook.webhook_id.clone(),
            event_id: event.id.clone(),
            event: event.kind.clone(),
            attempt,
            succeeded: error.is_none(),
            status,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
            at,
            next_attempt_at: None,
        }
    }

    /// Keeps the attempt in the delivery log (the latest [`KEEP_DELIVERIES`] per webhook).
    async fn log(&self, d: &WebhookDelivery) {
        let log = self.store.webhook_deliveries();
        if let Err(e) = log.put(d).await {
            tracing::error!(error = %e, "could not log a webhook delivery");
            return;
        }
        if !d.succeeded {
            tracing::warn!(webhook = %d.webhook_id, event = %d.event, attempt = d.attempt,
                error = d.error.as_deref().unwrap_or(""), "webhook delivery failed");
        }
        if let Ok(all) = log.list(&d.webhook_id).await {
            // Newest first: drop the tail.
            for old in all.iter().skip(KEEP_DELIVERIES) {
                let _ = log.remove(&old.webhook_id, &old.delivery_id).await;
            }
        }
    }

    // ---- the user's side ------------------------------------------------------------------

    pub async fn list(&self, owner: &str) -> Result<Vec<WebhookRecord>> {
        Ok(self.store.webhooks().list(owner).await?)
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<WebhookRecord> {
        self.store
            .webhooks()
            .get(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("webhook"))
    }

    /// A new webhook (its secret is in the record: shown to the user once).
    pub async fn create(&self, owner: &str, change: Change) -> Result<WebhookRecord> {
        let url = check_url(
            change.url.as_deref().unwrap_or(""),
            self.policy.allow_private,
        )?;
        let events = check_events(change.events.unwrap_or_else(|| vec!["*".into()]))?;
        let description = check_description(change.description.unwrap_or_default())?;
        if self.store.webhooks().list(owner).await?.len() >= MAX_WEBHOOKS {
            return Err(Error::conflict(
                "too_many_webhooks",
                format!("at most {MAX_WEBHOOKS} webhooks per account: delete one first"),
            ));
        }
        let mut key = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut key);
        let record = WebhookRecord {
            webhook_id: new_id(),
            owner: owner.to_string(),
            url,
            events,
            secret: format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(key)
            ),
            description,
            active: change.active.unwrap_or(true),
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.webhooks().put(&record).await?;
        Ok(record)
    }

    pub async fn update(&self, owner: &str, id: &str, change: Change) -> Result<WebhookRecord> {
        let allow = self.policy.allow_private;
        let url = change
            .url
            .as_deref()
            .map(|u| check_url(u, allow))
            .transpose()?;
        let events = change.events.map(check_events).transpose()?;
        let description = change.description.map(check_description).transpose()?;
        let active = change.active;
        self.store
            .webhooks()
            .update(owner, id, move |h| {
                if let Some(u) = &url {
                    h.url = u.clone();
                }
                if let Some(e) = &events {
                    h.events = e.clone();
                }
                if let Some(d) = &description {
                    h.description = d.clone();
                }
                if let Some(a) = active {
                    h.active = a;
                }
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("webhook"))
    }

    /// Deletes the webhook and its delivery log.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<()> {
        self.store
            .webhooks()
            .remove(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("webhook"))?;
        let log = self.store.webhook_deliveries();
        for d in log.list(id).await? {
            log.remove(id, &d.delivery_id).await?;
        }
        Ok(())
    }

    /// The webhook's latest attempts, newest first.
    pub async fn deliveries(&self, owner: &str, id: &str) -> Result<Vec<WebhookDelivery>> {
        self.get(owner, id).await?;
        Ok(self.store.webhook_deliveries().list(id).await?)
    }

    /// Sends a `webhook.test` event now (retried like any other if it fails) and returns the
    /// first attempt.
    pub async fn test(self: &Arc<Self>, owner: &str, id: &str) -> Result<WebhookDelivery> {
        let hook = self.get(owner, id).await?;
        let event = Event::new(
            "webhook.test",
            json!({"webhook_id": hook.webhook_id, "message": "a test event from ferrotune"}),
        );
        // The first attempt is awaited; the retries (if any) go on in the background.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move { this.deliver(hook, &event, Some(tx)).await });
        rx.await
            .map_err(|_| Error::internal("the test delivery did not run"))
    }
}

/// One event, as sent (the same body and id on every attempt).
struct Event {
    id: String,
    kind: String,
    body: Value,
}

impl Event {
    fn new(kind: &str, data: Value) -> Event {
        let id = format!("evt_{}", new_id());
        let body = json!({
            "object": "event",
            "id": id,
            "type": kind,
            "created_at": OffsetDateTime::now_utc().unix_timestamp(),
            "data": data,
        });
        Event {
            id,
            kind: kind.to_string(),
            body,
        }
    }
}

/// `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>` keyed by the secret's bytes.
pub fn sign(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &str,
) -> std::result::Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "the webhook's secret is not valid base64".to_string())?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|_| "unusable webhook secret".to_string())?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Does a webhook that asked for `wanted` get `event`? (`*`, `task.*`, or the exact type.)
pub(crate) fn subscribed(wanted: &[String], event: &str) -> bool {
    wanted.iter().any(|w| {
        w == "*"
            || w == event
            || w.strip_suffix(".*")
                .is_some_and(|kind| event.strip_prefix(kind).is_some_and(|r| r.starts_with('.')))
    })
}

/// Refused private addresses, for the resolver and the URL check.
const PRIVATE_REFUSED: &str = "a loopback, private or link-local address (an administrator may \
     allow those with webhook_allow_private_addresses)";

/// Is `ip` on the public internet (not loopback, private, link-local, CGNAT, unique-local,
/// multicast, unspecified or documentation)?
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s0 = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s0 & 0xfe00) == 0xfc00
                || (s0 & 0xffc0) == 0xfe80)
        }
    }
}

/// A resolver that keeps only public addresses.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves only to {PRIVATE_REFUSED}").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn check_url(url: &str, allow_private: bool) -> Result<String> {
    let url = url.trim();
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Error::invalid(format!("url: not a valid URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::invalid("url: must start with http:// or https://"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid("url: has no host"));
    }
    let literal = parsed.host_str().and_then(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok()
    });
    let local_name = parsed
        .host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case("localhost") || h.ends_with(".localhost"));
    if !allow_private && (literal.is_some_and(|ip| !is_public(ip)) || local_name) {
        return Err(Error::invalid(format!("url: points at {PRIVATE_REFUSED}")));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Error::invalid(
            "url: credentials in the URL are not kept; verify the signature instead",
        ));
    }
    if url.len() > 2000 {
        return Err(Error::invalid("url: longer than 2000 characters"));
    }
    Ok(url.to_string())
}

pub(crate) fn check_events(events: Vec<String>) -> Result<Vec<String>> {
    if events.is_empty() {
        return Err(Error::invalid(
            "events: name at least one (or \"*\" for all)",
        ));
    }
    for e in &events {
        let known = e == "*"
            || EVENTS.contains(&e.as_str())
            || e.strip_suffix(".*")
                .is_some_and(|k| EVENTS.iter().any(|x| x.split('.').next() == Some(k)));
        if !known {
            return Err(Error::invalid(format!(
                "events: unknown event {e:?}; known: {}, a kind such as \"task.*\", or \"*\"",
                EVENTS.join(", ")
            )));
        }
    }
    let mut events = events;
    events.sort();
    events.dedup();
    Ok(events)
}

fn check_description(d: String) -> Result<String> {
    if d.chars().count() > 200 {
        return Err(Error::invalid("description: longer than 200 characters"));
    }
    Ok(d.trim().to_string())
}

/// A transport error in words (the innermost cause says most: "connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = s.to_string();
        source = s.source();
    }
    format!("could not deliver: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification (its test vector).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("whsec_%%%", "a", 1, "b").is_err());
    }

    #[test]
    fn subscriptions_match_types_kinds_and_all() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(subscribed(&w(&["*"]), "export.failed"));
        assert!(subscribed(&w(&["task.*"]), "task.succeeded"));
        assert!(!subscribed(&w(&["task.*"]), "tasks.succeeded"));
        assert!(!subscribed(&w(&["task.*"]), "evaluation.succeeded"));
        assert!(subscribed(&w(&["task.failed", "export.*"]), "task.failed"));
        assert!(!subscribed(&w(&["task.failed"]), "task.succeeded"));
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(check_url("ftp://x/y", true).is_err());
        assert!(check_url("not a url", true).is_err());
        assert!(check_url("https://user:pw@example.com/h", true).is_err());
        assert_eq!(
            check_url(" https://example.com/hook ", false).unwrap(),
            "https://example.com/hook"
        );
        for private in [
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.1.2.3/x",
            "http://169.254.169.254/latest",
            "http://[::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:192.168.1.1]/x",
            "http://100.64.0.1/x",
        ] {
            let e = check_url(private, false).unwrap_err();
            assert!(e.message.contains("private"), "{private}: {}", e.message);
            assert!(check_url(private, true).is_ok(), "{private}");
        }
        assert!(check_url("http://93.184.215.14/x", false).is_ok());
        assert!(check_events(vec![]).is_err());
        assert!(check_events(vec!["task.exploded".into()]).is_err());
        assert!(check_events(vec!["nothing.*".into()]).is_err());
        assert_eq!(
            check_events(vec![
                "task.*".into(),
                "export.failed".into(),
                "task.*".into()
            ])
            .unwrap(),
            vec!["export.failed", "task.*"]
        );
    }
}
