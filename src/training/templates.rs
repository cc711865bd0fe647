//! Training templates (seed 004): a task's settings saved under a name, to start new tasks
//! from — on another dataset, with a few fields changed.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::spec::TaskRequest;
use super::{Task, Training};
use crate::error::{Error, Kind, Result};
use crate::store::{TaskTemplate, new_id};

/// What a template does not keep: the task's own name and data.
const NOT_SETTINGS: &[&str] = &[
    "name",
    "dataset_id",
    "dataset_path",
    "output_dir",
    "eval_dataset_id",
    "validation_dataset_id",
    "eval_split",
];

/// Most templates one user keeps.
const MAX_TEMPLATES: usize = 200;

fn invalid(message: String) -> Error {
    Error::new(Kind::Invalid, "invalid_template", message)
}

/// `settings` without the task-specific fields, checked as `POST /api/tasks` checks them.
fn checked(mut settings: Map<String, Value>) -> Result<Map<String, Value>> {
    for k in NOT_SETTINGS {
        settings.remove(*k);
    }
    // A template may leave the model to the task: the probe names one to check the rest.
    let mut probe = settings.clone();
    probe.insert("name".into(), json!("template"));
    probe
        .entry("model_name")
        .or_insert_with(|| json!("template"));
    let request: TaskRequest = serde_json::from_value(Value::Object(probe))
        .map_err(|e| invalid(format!("settings: {e}")))?;
    request
        .into_spec()
        .map_err(|e| invalid(format!("settings.{}", e.message)))?;
    Ok(settings)
}

impl Training {
    /// Saves `settings` (a task body) as the owner's template `name` (names are unique per
    /// user, case-insensitively).
    pub async fn save_template(
        &self,
        owner: &str,
        name: &str,
        settings: Map<String, Value>,
    ) -> Result<TaskTemplate> {
        let name = crate::text::clean_name(name);
        if name.is_empty() || name.chars().count() > 100 {
            return Err(invalid("name: 1 to 100 characters".into()));
        }
        let settings = checked(settings)?;
        let _owner = self.owners.lock(owner).await;
        let existing = self.store.task_templates().list(owner).await?;
        if existing
            .iter()
            .any(|t| t.name.to_lowercase() == name.to_lowercase())
        {
            return Err(Error::conflict(
                "template_exists",
                format!("you already have a template named `{name}`: delete it or pick another"),
            ));
        }
        if existing.len() >= MAX_TEMPLATES {
            return Err(Error::conflict(
                "too_many_templates",
                format!("at most {MAX_TEMPLATES} templates: delete some first"),
            ));
        }
        let template = TaskTemplate {
            template_id: new_id(),
            owner: owner.to_string(),
            name,
            settings,
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.task_templates().put(&template).await?;
        Ok(template)
    }

    /// A task's settings as a template body.
    pub fn settings_of(task: &Task) -> Result<Map<String, Value>> {
        if task.spec.evaluation.is_some() {
            return Err(invalid(
                "task_id: an evaluation has no training settings to keep".into(),
            ));
        }
        match serde_json::to_value(&task.spec).map_err(Error::internal)? {
            Value::Object(map) => Ok(map),
            _ => Err(Error::internal("a task's spec is not an object")),
        }
    }

    /// The owner's templates, by name.
    pub async fn templates(&self, owner: &str) -> Result<Vec<TaskTemplate>> {
        let mut all = self.store.task_templates().list(owner).await?;
        all.sort_by_key(|t| t.name.to_lowercase());
        Ok(all)
    }

    pub async fn template(&self, owner: &str, id: &str) -> Result<TaskTemplate> {
        self.store
            .task_templates()
            .get(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("template"))
    }

    pub async fn delete_template(&self, owner: &str, id: &str) -> Result<()> {
        self.store
            .task_templates()
            .remove(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("template"))?;
        Ok(())
    }

    /// Queues a task from a template: its settings, then `fields` (the task's `name`, its
    /// dataset, anything to change) over them.
    pub async fn submit_from_template(
        &self,
        owner: &str,
        id: &str,
        fields: Map<String, Value>,
    ) -> Result<Task> {
        let template = self.template(owner, id).await?;
        let mut body = template.settings;
        if fields.contains_key("model_name") && !fields.contains_key("template") {
            // The chat template follows a changed model unless named.
            body.remove("template");
        }
        body.extend(fields);
        let request: TaskRequest = serde_json::from_value(Value::Object(body))
            .map_err(|e| Error::new(Kind::Invalid, "invalid_body", e.to_string()))?;
        self.submit(owner, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_drop_the_task_specific_fields_and_are_checked() {
        let s = checked(
            json!({"name": "n", "dataset_id": "d", "epochs": 2, "lora_rank": 16,
                   "lr_scheduler_type": "linear"})
            .as_object()
            .unwrap()
            .clone(),
        )
        .unwrap();
        assert_eq!(
            Value::Object(s),
            json!({"epochs": 2, "lora_rank": 16, "lr_scheduler_type": "linear"})
        );
        for (bad, says) in [
            (json!({"lora_rank": 0}), "settings.lora_rank:"),
            (json!({"bogus": 1}), "unknown field `bogus`"),
        ] {
            let e = checked(bad.as_object().unwrap().clone()).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }
}
