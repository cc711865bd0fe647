//! E-mail through an SMTP relay, when one is configured (`smtp_url`): password-reset codes,
//! the confirmation code of a new address, and the notices users ask for by e-mail
//! (`email_events`, chosen like webhooks' events). Sent by `lettre` over the async runtime;
//! a failed send is logged, never shown to whoever caused it (it would tell them whether an
//! address has an account).

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::notify::{Notice, Notices};
use crate::store::Store;

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// The mailer of the configuration; `None` without `smtp_url`. A URL or sender that does
    /// not parse is an error at start.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Option<Arc<Mailer>>> {
        let url = config.smtp_url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("smtp_url: {e}"))?
            .timeout(Some(Duration::from_secs(config.smtp_timeout_secs.max(1))))
            .build();
        let from: Mailbox = config
            .smtp_from
            .parse()
            .map_err(|e| anyhow::anyhow!("smtp_from: {e}"))?;
        Ok(Some(Arc::new(Mailer { transport, from })))
    }

    /// Sends a plain-text message; the error says why not.
    pub async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), String> {
        let to: Mailbox = to.parse().map_err(|e| format!("recipient {to:?}: {e}"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| e.to_string())?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Sends and logs the outcome (for callers that must not reveal it).
    pub async fn send_logged(&self, to: &str, subject: &str, body: String, what: &str) {
        match self.send(to, subject, body).await {
            Ok(()) => tracing::info!(what, "e-mail sent"),
            Err(e) => tracing::warn!(what, error = %e, "e-mail not sent"),
        }
    }

    /// Mails each notice to its owner when their `email_events` ask for it, until the process
    /// ends.
    pub fn spawn_notices(self: &Arc<Self>, store: Store, notices: &Notices) {
        let mut rx = notices.subscribe();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(n) => {
                        let this = this.clone();
                        let store = store.clone();
                        // One slow relay must not hold the next notices.
                        tokio::spawn(async move { this.mail_notice(&store, &n).await });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "e-mail notices fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    async fn mail_notice(&self, store: &Store, n: &Notice) {
        let user = match store.user(&n.owner).await {
            Ok(Some(u)) if !u.disabled => u,
            // Deleted or disabled since: nobody to mail.
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(event = %n.event, error = %e, "e-mail notice not sent: the account could not be read");
                return;
            }
        };
        if !crate::webhooks::subscribed(&user.email_events, &n.event) {
            return;
        }
        let (subject, body) = describe(n);
        self.send_logged(&user.email, &subject, body, &n.event)
            .await;
    }
}

/// A notice as an e-mail's subject and text.
fn describe(n: &Notice) -> (String, String) {
    let d = &n.data;
    let field = |k: &str| d[k].as_str().map(str::to_string);
    let name = field("name")
        .or_else(|| field("message"))
        .unwrap_or_default();
    let subject = if name.is_empty() {
        format!("ferrotune: {}", n.event)
    } else {
        format!("ferrotune: {} - {name}", n.event)
    };
    let mut body = format!("Event: {}\n", n.event);
    if let serde_json::Value::Object(map) = d {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            body.push_str(&format!("{k}: {v}\n"));
        }
    }
    body.push_str(
        "\nYou get this because your ferrotune account asks for these events by e-mail; \
         change that on the account page.\n",
    );
    (subject, body)
}
