//! Saved conversations: create, list, read, rename, append, delete, export.

use time::OffsetDateTime;

use crate::error::{Error, Kind, Result};
use crate::inference::ChatMessage;
pub use crate::store::{ChatSession as Session, SessionMessage};
use crate::store::{Store, new_id};

#[derive(Clone)]
pub struct Sessions {
    store: Store,
}

/// What a rename may change.
#[derive(Debug, Clone, Default)]
pub struct SessionChange {
    pub title: Option<String>,
    /// The model it talks to (already resolved by the caller).
    pub model: Option<String>,
}

/// A title as people write it: cleaned, 1 to 200 characters.
pub fn check_title(title: &str) -> Result<String> {
    let t = crate::text::clean_name(title);
    if t.is_empty() || t.chars().count() > 200 {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_title",
            "title must be 1 to 200 characters",
        ));
    }
    Ok(t)
}

fn stamped(messages: Vec<ChatMessage>, at: OffsetDateTime) -> Vec<SessionMessage> {
    messages
        .into_iter()
        .map(|m| SessionMessage {
            role: m.role,
            content: m.content,
            created_at: at,
        })
        .collect()
}

impl Sessions {
    pub fn new(store: Store) -> Sessions {
        Sessions { store }
    }

    /// A new conversation (`title` default "New chat"), optionally with first messages.
    pub async fn create(
        &self,
        owner: &str,
        title: Option<&str>,
        model: Option<String>,
        messages: Vec<ChatMessage>,
    ) -> Result<Session> {
        let title = match title {
            Some(t) => check_title(t)?,
            None => "New chat".into(),
        };
        let now = OffsetDateTime::now_utc();
        let session = Session {
            session_id: new_id(),
            owner: owner.to_string(),
            title,
            model,
            messages: stamped(messages, now),
            created_at: now,
            updated_at: now,
        };
        self.store.chat_sessions().put(&session).await?;
        Ok(session)
    }

    /// The owner's conversations, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<Session>> {
        Ok(self.store.chat_sessions().list(owner).await?)
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<Session> {
        self.store
            .chat_sessions()
            .get(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("chat session"))
    }

    /// Renames and/or re-targets a conversation, atomically.
    pub async fn change(&self, owner: &str, id: &str, change: SessionChange) -> Result<Session> {
        let title = change.title.as_deref().map(check_title).transpose()?;
        let model = change.model;
        let now = OffsetDateTime::now_utc();
        self.store
            .chat_sessions()
            .update(owner, id, move |s| {
                if let Some(t) = &title {
                    s.title = t.clone();
                }
                if let Some(m) = &model {
                    s.model = Some(m.clone());
                }
                s.updated_at = now;
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("chat session"))
    }

    /// Appends messages, atomically: messages appended at the same time all stay.
    pub async fn append(
        &self,
        owner: &str,
        id: &str,
        messages: Vec<ChatMessage>,
        model: Option<String>,
    ) -> Result<Session> {
        let now = OffsetDateTime::now_utc();
        let added = stamped(messages, now);
        self.store
            .chat_sessions()
            .update(owner, id, move |s| {
                s.messages.extend(added.iter().cloned());
                if let Some(m) = &model {
                    s.model = Some(m.clone());
                }
                s.updated_at = now;
                true
            })
            .await?
            .ok_or_else(|| Error::not_found("chat session"))
    }

    pub async fn delete(&self, owner: &str, id: &str) -> Result<Session> {
        self.store
            .chat_sessions()
            .remove(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("chat session"))
    }
}

/// A conversation as Markdown: a title, the model, then one section per message.
pub fn to_markdown(s: &Session) -> String {
    let mut out = format!("# {}\n\n", s.title);
    if let Some(m) = &s.model {
        out.push_str(&format!("*Model: {m}*\n\n"));
    }
    for m in &s.messages {
        let who = match m.role.as_str() {
            "user" => "User",
            "assistant" => "Assistant",
            "system" => "System",
            other => other,
        };
        out.push_str(&format!("## {who}\n\n{}\n\n", m.content.trim_end()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_export() {
        let now = OffsetDateTime::now_utc();
        let s = Session {
            session_id: "s".into(),
            owner: "o".into(),
            title: "Sums".into(),
            model: Some("m1".into()),
            messages: vec![
                SessionMessage {
                    role: "user".into(),
                    content: "What is 3 plus 4?".into(),
                    created_at: now,
                },
                SessionMessage {
                    role: "assistant".into(),
                    content: "3 plus 4 is 7.\n".into(),
                    created_at: now,
                },
            ],
            created_at: now,
            updated_at: now,
        };
        assert_eq!(
            to_markdown(&s),
            "# Sums\n\n*Model: m1*\n\n## User\n\nWhat is 3 plus 4?\n\n## Assistant\n\n3 plus 4 is 7.\n\n"
        );
    }

    #[test]
    fn titles() {
        assert_eq!(check_title(" a\u{202E}b ").unwrap(), "ab");
        assert!(check_title("   ").is_err());
        assert!(check_title(&"x".repeat(201)).is_err());
    }
}
