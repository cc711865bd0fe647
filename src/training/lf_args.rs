//! `extra_args`: any other LlamaFactory argument, checked before a task is queued against
//! LlamaFactory's own argument parser (the dataclasses its `HfArgumentParser` reads:
//! `llamafactory.hparams.parser._TRAIN_ARGS`), so a typo or a wrong type is a 422 naming the
//! key instead of a run that fails minutes later.
//!
//! The parser's fields and their types are read once per environment by the managed Python
//! (about 10 s: it imports transformers) and kept next to it in a JSON file.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Kind, Result};

/// A field's type as the parser converts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ArgType {
    Bool,
    Int,
    Float,
    Str,
    Choice {
        choices: Vec<String>,
    },
    /// Unions, lists, dicts: passed to the parser as given.
    Any,
}

/// Every field of LlamaFactory's training parser.
pub type ArgTypes = HashMap<String, ArgType>;

/// Reads the parser's fields with the managed Python (prints `{name: {type, choices?}}`).
const SCRIPT: &str = r#"
import dataclasses, enum, json, sys, types, typing
from llamafactory.hparams.parser import _TRAIN_ARGS

def describe(t):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        inner = [describe(a) for a in typing.get_args(t) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
        kinds = {d["type"] for d in inner}
        if kinds <= {"choice", "str"}:
            return {"type": "str"}
        if kinds == {"int", "float"}:
            return {"type": "float"}
        return {"type": "any"}
    if origin is typing.Literal:
        return {"type": "choice", "choices": [str(a) for a in typing.get_args(t)]}
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return {"type": "choice", "choices": [str(m.value) for m in t]}
    for py, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if t is py:
            return {"type": name}
    return {"type": "any"}

out = {}
for cls in _TRAIN_ARGS:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = describe(hints.get(f.name, f.type))
json.dump(out, sys.stdout)
"#;

/// Where the environment's field list is kept.
fn cache_file(python: &std::path::Path) -> PathBuf {
    python
        .parent()
        .and_then(|bin| bin.parent())
        .unwrap_or_else(|| std::path::Path::new("."))
        .join("ferrotune-llamafactory-args.json")
}

/// The parser's fields: from the file kept next to the environment, or read now with its
/// Python (blocking: run it where blocking is allowed).
pub fn read(python: &std::path::Path) -> Result<ArgTypes> {
    let file = cache_file(python);
    if let Ok(bytes) = std::fs::read(&file)
        && let Ok(types) = serde_json::from_slice::<ArgTypes>(&bytes)
        && !types.is_empty()
    {
        return Ok(types);
    }
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .env("PYTHONNOUSERSITE", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::internal(format!("cannot run {}: {e}", python.display())))?;
    if !output.status.success() {
        return Err(Error::internal(format!(
            "reading LlamaFactory's arguments failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    let types: ArgTypes = serde_json::from_slice(&output.stdout).map_err(|e| {
        Error::internal(format!(
            "LlamaFactory's arguments did not read as JSON: {e}"
        ))
    })?;
    // Written whole, then renamed: a concurrent reader never sees half a file.
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &output.stdout).is_ok() && std::fs::rename(&tmp, &file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(types)
}

/// What a task's own settings set (the task field to use instead), or `None`.
fn managed(key: &str) -> Option<&'static str> {
    Some(match key {
        "model_name_or_path" | "model_revision" => "model_name",
        "dataset" | "dataset_dir" | "eval_dataset" => "dataset_id / validation_dataset_id",
        "stage" => "stage",
        "finetuning_type" => "finetuning_type",
        "template" => "template",
        "default_system" => "system",
        "cutoff_len" => "cutoff_len",
        "learning_rate" => "learning_rate",
        "num_train_epochs" => "epochs",
        "max_steps" => "max_steps",
        "per_device_train_batch_size" | "per_device_eval_batch_size" => "batch_size",
        "gradient_accumulation_steps" => "gradient_accumulation_steps",
        "lora_rank" => "lora_rank",
        "lora_alpha" => "lora_alpha",
        "lora_dropout" => "lora_dropout",
        "lora_target" => "lora_target",
        "use_rslora" => "use_rslora",
        "use_dora" => "use_dora",
        "pissa_init" | "pissa_convert" | "pissa_iter" => "pissa",
        "loraplus_lr_ratio" => "loraplus_lr_ratio",
        "freeze_trainable_layers" => "freeze_trainable_layers",
        "freeze_trainable_modules" => "freeze_trainable_modules",
        "lr_scheduler_type" => "lr_scheduler_type",
        "warmup_ratio" => "warmup_ratio",
        "warmup_steps" => "warmup_steps",
        "weight_decay" => "weight_decay",
        "max_grad_norm" => "max_grad_norm",
        "packing" => "packing",
        "neftune_noise_alpha" => "neftune_noise_alpha",
        "pref_beta" => "pref_beta",
        "pref_loss" => "pref_loss",
        "val_size" | "eval_strategy" | "eval_steps" | "do_eval" => {
            "val_size / validation_dataset_id"
        }
        "seed" => "seed",
        "logging_steps" => "logging_steps",
        "save_steps" | "save_strategy" => "save_steps / save_minutes",
        "bf16" | "fp16" | "pure_bf16" => "precision",
        "quantization_bit" | "quantization_method" => "quantization_bit",
        "deepspeed" => "deepspeed",
        "do_train" | "do_predict" | "predict_with_generate" | "max_samples" => {
            "the task's kind (training or evaluation)"
        }
        _ => return None,
    })
}

/// Refused whatever its value: it would write or read outside the task, reach the network,
/// or make a model chat cannot apply.
fn refused(key: &str) -> Option<&'static str> {
    if key.ends_with("_dir")
        || key.contains("path")
        || key.starts_with("hub_")
        || key.starts_with("push_to_hub")
        || key.starts_with("ray_")
        || key.starts_with("swanlab")
        || key.starts_with("use_mca")
        || matches!(
            key,
            "output_dir"
                | "logging_dir"
                | "resume_from_checkpoint"
                | "overwrite_output_dir"
                | "report_to"
                | "trust_remote_code"
                | "export_dir"
                | "plot_loss"
                | "save_only_model"
                | "include_for_metrics"
        )
    {
        return Some(
            "the server decides where a task reads and writes and what it reports to; this \
             argument is not offered",
        );
    }
    None
}

/// Checks `extra` against the parser's fields: a 422 naming the first bad key.
pub fn check(extra: &BTreeMap<String, Value>, types: &ArgTypes) -> Result<()> {
    let bad = |key: &str, why: String| {
        Error::new(
            Kind::Invalid,
            "invalid_spec",
            format!("extra_args.{key}: {why}"),
        )
    };
    for (key, value) in extra {
        if let Some(field) = managed(key) {
            return Err(bad(
                key,
                format!("set from the task's own settings: use `{field}`"),
            ));
        }
        if let Some(why) = refused(key) {
            return Err(bad(key, why.to_string()));
        }
        let Some(kind) = types.get(key) else {
            let mut near: Vec<&String> = types
                .keys()
                .filter(|k| strsim::jaro_winkler(k, key) > 0.88)
                .collect();
            near.sort();
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!(
                    " (did you mean {}?)",
                    near.iter()
                        .take(3)
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(bad(
                key,
                format!("not an argument of LlamaFactory's parser{hint}"),
            ));
        };
        let fits = match kind {
            ArgType::Bool => value.is_boolean(),
            ArgType::Int => value.as_i64().is_some() || value.as_u64().is_some(),
            ArgType::Float => value.is_number(),
            ArgType::Str => value.is_string(),
            ArgType::Choice { choices } => value
                .as_str()
                .is_some_and(|v| choices.iter().any(|c| c == v)),
            ArgType::Any => !value.is_null(),
        };
        if !fits {
            let expected = match kind {
                ArgType::Bool => "true or false".to_string(),
                ArgType::Int => "a whole number".to_string(),
                ArgType::Float => "a number".to_string(),
                ArgType::Str => "a string".to_string(),
                ArgType::Choice { choices } => format!("one of {}", choices.join(", ")),
                ArgType::Any => "a value".to_string(),
            };
            return Err(bad(
                key,
                format!("LlamaFactory's parser expects {expected}, got {value}"),
            ));
        }
    }
    Ok(())
}

/// The parser's fields for the environment at `python`, read once per process.
#[derive(Default)]
pub struct ArgCache(tokio::sync::OnceCell<Arc<ArgTypes>>);

impl ArgCache {
    pub async fn get(&self, python: PathBuf) -> Result<Arc<ArgTypes>> {
        self.0
            .get_or_try_init(|| async move {
                let types = tokio::task::spawn_blocking(move || read(&python)).await??;
                Ok::<_, Error>(Arc::new(types))
            })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn types() -> ArgTypes {
        HashMap::from([
            ("optim".to_string(), ArgType::Str),
            ("enable_liger_kernel".to_string(), ArgType::Bool),
            ("adam_beta2".to_string(), ArgType::Float),
            ("save_total_limit".to_string(), ArgType::Int),
            (
                "rope_scaling".to_string(),
                ArgType::Choice {
                    choices: vec!["linear".into(), "dynamic".into()],
                },
            ),
            ("use_dora".to_string(), ArgType::Bool),
            ("cache_dir".to_string(), ArgType::Str),
        ])
    }

    fn args(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn extra_args_are_checked_by_name_and_type() {
        let t = types();
        check(
            &args(
                json!({"optim": "adamw_torch", "adam_beta2": 0.95, "save_total_limit": 2,
                         "rope_scaling": "linear", "enable_liger_kernel": false}),
            ),
            &t,
        )
        .unwrap();
        for (v, says) in [
            (json!({"optimm": "adamw_torch"}), "did you mean `optim`"),
            (json!({"adam_beta2": "high"}), "expects a number"),
            (json!({"save_total_limit": 1.5}), "a whole number"),
            (json!({"rope_scaling": "cubic"}), "one of linear, dynamic"),
            (json!({"enable_liger_kernel": "yes"}), "true or false"),
            (json!({"learning_rate": 0.1}), "use `learning_rate`"),
            (json!({"use_dora": true}), "use `use_dora`"),
            (json!({"cache_dir": "/tmp"}), "not offered"),
            (json!({"output_dir": "/tmp"}), "not offered"),
        ] {
            let key = v.as_object().unwrap().keys().next().unwrap().clone();
            let e = check(&args(v.clone()), &t).unwrap_err();
            assert!(
                e.message.starts_with(&format!("extra_args.{key}:")) && e.message.contains(says),
                "{v}: {}",
                e.message
            );
        }
    }
}
