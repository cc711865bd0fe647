//! A training task's specification: what the client sends, its validation (every bad value is
//! a 422 at submit time), and its mapping to LlamaFactory arguments.

use std::path::Path;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::datasets::format::{Container, DatasetFormat, DatasetKind};
use crate::error::{Error, Kind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Supervised fine-tuning: imitate the answers.
    #[default]
    Sft,
    /// Continued pre-training on plain text.
    Pt,
    /// A reward model: learns to score the chosen answer above the rejected one.
    Rm,
    /// Direct preference optimisation (and its ORPO, SimPO, IPO losses): prefer the chosen
    /// answer over the rejected one.
    Dpo,
    /// Kahneman-Tversky optimisation: answers labelled good or bad.
    Kto,
}

impl Stage {
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Pt => "pt",
            Stage::Rm => "rm",
            Stage::Dpo => "dpo",
            Stage::Kto => "kto",
        }
    }

    /// The kind of dataset the stage trains on.
    pub fn dataset_kind(&self) -> DatasetKind {
        match self {
            Stage::Sft => DatasetKind::Supervised,
            Stage::Pt => DatasetKind::Text,
            Stage::Rm | Stage::Dpo => DatasetKind::Preference,
            Stage::Kto => DatasetKind::Kto,
        }
    }

    /// The stage a dataset of `kind` trains with when the task names none.
    pub fn for_dataset(kind: DatasetKind) -> Stage {
        match kind {
            DatasetKind::Supervised => Stage::Sft,
            DatasetKind::Text => Stage::Pt,
            DatasetKind::Preference => Stage::Dpo,
            DatasetKind::Kto => Stage::Kto,
        }
    }

    /// The stages a dataset of `kind` trains with, the default first.
    pub fn fitting(kind: DatasetKind) -> Vec<Stage> {
        let first = Stage::for_dataset(kind);
        let mut stages = vec![first];
        stages.extend(
            [Stage::Sft, Stage::Pt, Stage::Dpo, Stage::Kto, Stage::Rm]
                .into_iter()
                .filter(|s| s.dataset_kind() == kind && *s != first),
        );
        stages
    }

    /// Whether the result generates text to chat with (a reward model scores instead).
    pub fn chats(&self) -> bool {
        !matches!(self, Stage::Rm)
    }
}

/// DPO's loss (LlamaFactory's `pref_loss`): `sigmoid` is DPO's own; `orpo` and `simpo` need
/// no reference model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrefLoss {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
    Orpo,
    Simpo,
}

impl PrefLoss {
    pub fn as_str(&self) -> &'static str {
        match self {
            PrefLoss::Sigmoid => "sigmoid",
            PrefLoss::Hinge => "hinge",
            PrefLoss::Ipo => "ipo",
            PrefLoss::Orpo => "orpo",
            PrefLoss::Simpo => "simpo",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinetuningType {
    #[default]
    Lora,
    Full,
    /// Freeze-tuning: only the last `freeze_trainable_layers` layers train (a full model).
    Freeze,
}

impl FinetuningType {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinetuningType::Lora => "lora",
            FinetuningType::Full => "full",
            FinetuningType::Freeze => "freeze",
        }
    }
}

/// The learning-rate schedule (Hugging Face's `SchedulerType`s that need no extra arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Linear,
    #[default]
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
}

impl LrScheduler {
    pub fn as_str(&self) -> &'static str {
        match self {
            LrScheduler::Linear => "linear",
            LrScheduler::Cosine => "cosine",
            LrScheduler::CosineWithRestarts => "cosine_with_restarts",
            LrScheduler::Polynomial => "polynomial",
            LrScheduler::Constant => "constant",
            LrScheduler::ConstantWithWarmup => "constant_with_warmup",
            LrScheduler::InverseSqrt => "inverse_sqrt",
        }
    }
}

fn default_warmup_ratio() -> f64 {
    0.1
}

fn default_max_grad_norm() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Bf16,
    Fp16,
    Fp32,
}

/// The body of `POST /api/tasks`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    pub name: String,
    pub model_name: String,
    pub dataset_id: Option<String>,
    pub dataset_path: Option<String>,
    pub epochs: Option<f64>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<u32>,
    pub output_dir: Option<String>,
    /// Omitted: the stage the dataset's kind fits (sft, pt for plain text, dpo for
    /// preference pairs, kto for labelled answers).
    pub stage: Option<Stage>,
    /// `dpo`: the preference loss (sigmoid, hinge, ipo, orpo, simpo).
    pub pref_loss: Option<PrefLoss>,
    /// `dpo`/`kto`: β, how far the model may move from the reference (0.1 by default).
    pub pref_beta: Option<f64>,
    pub finetuning_type: Option<FinetuningType>,
    pub lora_rank: Option<u32>,
    pub lora_alpha: Option<u32>,
    pub lora_dropout: Option<f64>,
    pub lora_target: Option<String>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub cutoff_len: Option<u32>,
    pub val_size: Option<f64>,
    pub seed: Option<u64>,
    pub precision: Option<Precision>,
    pub gradient_accumulation_steps: Option<u32>,
    pub max_steps: Option<u64>,
    pub save_steps: Option<u64>,
    /// Also save a checkpoint once this many minutes have passed since the last one
    /// (fractions allowed); none: by `save_steps` only.
    pub save_minutes: Option<f64>,
    pub logging_steps: Option<u64>,
    pub gpus: Option<u32>,
    /// Specific GPUs by index (as `nvidia-smi` numbers them, among those the server hands
    /// out): the task waits until all of them are free. Sets `gpus` to their number.
    pub gpu_ids: Option<Vec<u32>>,
    /// QLoRA: the frozen base loaded in 4 or 8 bits (bitsandbytes) while the LoRA trains.
    pub quantization_bit: Option<u8>,
    /// DeepSpeed ZeRO stage (2 or 3) for a task on two or more GPUs.
    pub deepspeed: Option<u8>,
    pub priority: Option<i32>,
    /// When the task completes, evaluate its model (and its base, side by side) on this
    /// uploaded test set.
    pub eval_dataset_id: Option<String>,
    /// When the task completes, evaluate its model (and its base) on this fraction of the
    /// training data, held out from training (it sets `val_size`).
    pub eval_split: Option<f64>,
    /// The learning-rate schedule (`cosine` by default).
    pub lr_scheduler_type: Option<LrScheduler>,
    /// Warm-up as a fraction of the steps (0.1 by default); `warmup_steps` overrides it.
    pub warmup_ratio: Option<f64>,
    pub warmup_steps: Option<f64>,
    /// AdamW's decoupled weight decay (0 by default).
    pub weight_decay: Option<f64>,
    /// Gradient clipping (1.0 by default).
    pub max_grad_norm: Option<f64>,
    /// Pack several short examples into each `cutoff_len` sequence (`sft`, `pt`).
    pub packing: Option<bool>,
    /// NEFTune: noise of this α added to the embeddings while training.
    pub neftune_noise_alpha: Option<f64>,
    /// rsLoRA: the LoRA scaled by α/√r instead of α/r.
    pub use_rslora: Option<bool>,
    /// DoRA: weight-decomposed LoRA (a trained magnitude per output besides the low-rank
    /// direction change).
    pub use_dora: Option<bool>,
    /// PiSSA: the LoRA initialised from the weights' principal components (saved converted
    /// to an ordinary LoRA, so it chats over the unchanged base).
    pub pissa: Option<bool>,
    /// LoRA+: B's learning rate is this many times A's.
    pub loraplus_lr_ratio: Option<f64>,
    /// `freeze`: how many layers train (positive: the last ones; negative: the first ones).
    pub freeze_trainable_layers: Option<i32>,
    /// `freeze`: which modules of those layers train (`all`, or names like `mlp,self_attn`).
    pub freeze_trainable_modules: Option<String>,
    /// Any other LlamaFactory argument, checked against LlamaFactory's own argument parser
    /// (its fields and their types) before the task is queued.
    #[schema(value_type = Option<Object>)]
    pub extra_args: Option<BTreeMap<String, Value>>,
    /// While the task trains, score this uploaded dataset (of the training data's kind)
    /// every `save_steps`: its loss is the run's validation loss (LlamaFactory's
    /// `eval_dataset`). Instead of `val_size`.
    pub validation_dataset_id: Option<String>,
}

/// The validated specification with every default filled in: what a task runs with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TaskSpec {
    pub name: String,
    pub model_name: String,
    pub epochs: f64,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub stage: Stage,
    /// `dpo`'s loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pref_loss: Option<PrefLoss>,
    /// `dpo`/`kto`'s β.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pref_beta: Option<f64>,
    pub finetuning_type: FinetuningType,
    pub lora_rank: u32,
    pub lora_alpha: u32,
    pub lora_dropout: f64,
    pub lora_target: String,
    /// Empty: chosen from the model when the task is created.
    pub template: String,
    pub system: Option<String>,
    pub cutoff_len: u32,
    pub val_size: f64,
    pub seed: u64,
    pub precision: Precision,
    pub gradient_accumulation_steps: u32,
    pub max_steps: Option<u64>,
    pub save_steps: u64,
    /// Also a checkpoint every this many minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_minutes: Option<f64>,
    pub logging_steps: u64,
    pub gpus: u32,
    /// The GPUs asked for by index; empty: any `gpus` free ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<u32>,
    /// QLoRA's base precision in bits (4 or 8); none: the base in `precision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_bit: Option<u8>,
    /// DeepSpeed ZeRO stage (2 or 3); none: plain data parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepspeed: Option<u8>,
    pub priority: i32,
    /// Evaluate the result on this test set when the task completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dataset_id: Option<String>,
    /// Scored while the task trains (its validation loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_dataset_id: Option<String>,
    #[serde(default)]
    pub lr_scheduler_type: LrScheduler,
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub packing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neftune_noise_alpha: Option<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub pissa: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_trainable_layers: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_trainable_modules: Option<String>,
    /// Other LlamaFactory arguments, checked against its parser when the task was created.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub extra_args: BTreeMap<String, Value>,
    /// Evaluate the result on the held-out `val_size` rows when the task completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<f64>,
    /// Set on an evaluation: the task evaluates a model instead of training one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvalSpec>,
}

/// What an evaluation task evaluates, and how. The data are the task's dataset (`RunPaths`);
/// the model is `RunPaths::model_dir` (a base or a full model) with `adapter_dir` over it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EvalSpec {
    /// The model as chat names it: a base model's name or a trained model's id.
    pub model: String,
    /// Its name as its owner knows it.
    #[serde(default)]
    pub model_name: String,
    /// `base`, `adapter` or `full`.
    pub model_kind: crate::store::ModelKind,
    /// The LoRA adapter's folder, for an adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_dir: Option<String>,
    /// Evaluate on the rows a training run with this `val_size` (and the task's seed) holds
    /// out of the dataset; none: on every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<f64>,
    /// At most this many rows (of a test set; a held-out split is taken whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<u32>,
    /// Longest generated answer, in tokens.
    pub max_new_tokens: u32,
    /// The training task whose result (or held-out rows) this evaluates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_task_id: Option<String>,
    /// Evaluations made to be compared (a base and its fine-tune on the same rows) share a
    /// group: the id of the first of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// In a group: `baseline` (before) or `candidate` (after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A numeric field of a task: its default and the values accepted. The one source of these
/// rules: [`TaskRequest::into_spec`] checks them, and the web UI's form gets them from
/// `GET /api/tasks/form`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct NumericField {
    pub name: &'static str,
    pub min: f64,
    pub max: f64,
    /// `min` itself is refused (`(min, max]`).
    pub exclusive_min: bool,
    pub integer: bool,
    /// The default; none when the field may stay unset (or its default depends on another,
    /// as `lora_alpha` = 2 × `lora_rank`).
    pub default: Option<f64>,
    /// Unset is allowed.
    pub optional: bool,
}

const fn num(name: &'static str, min: f64, max: f64, default: f64) -> NumericField {
    NumericField {
        name,
        min,
        max,
        exclusive_min: false,
        integer: true,
        default: Some(default),
        optional: false,
    }
}

/// Every numeric field, as the server checks it.
pub const NUMERIC_FIELDS: &[NumericField] = &[
    NumericField {
        exclusive_min: true,
        integer: false,
        ..num("epochs", 0.0, 1000.0, 3.0)
    },
    NumericField {
        exclusive_min: true,
        integer: false,
        ..num("learning_rate", 0.0, 1.0, 5e-5)
    },
    num("batch_size", 1.0, 1024.0, 4.0),
    num("lora_rank", 1.0, 1024.0, 8.0),
    NumericField {
        default: None,
        optional: true,
        ..num("lora_alpha", 1.0, 4096.0, 0.0)
    },
    NumericField {
        integer: false,
        ..num("lora_dropout", 0.0, 0.9, 0.0)
    },
    num("cutoff_len", 16.0, 1_048_576.0, 2048.0),
    NumericField {
        integer: false,
        ..num("val_size", 0.0, 0.5, 0.0)
    },
    // PyTorch and NumPy take 32-bit seeds: a larger one fails the run much later.
    num("seed", 0.0, u32::MAX as f64, 42.0),
    num("gradient_accumulation_steps", 1.0, 1024.0, 1.0),
    NumericField {
        default: None,
        optional: true,
        ..num("max_steps", 1.0, 100_000_000.0, 0.0)
    },
    num("save_steps", 1.0, 10_000_000.0, 500.0),
    // Time-based checkpoints (seed 004 NFR-R3: every 10 minutes), besides `save_steps`.
    NumericField {
        default: None,
        optional: true,
        integer: false,
        exclusive_min: true,
        ..num("save_minutes", 0.0, 1440.0, 0.0)
    },
    num("logging_steps", 1.0, 1_000_000.0, 10.0),
    NumericField {
        integer: false,
        ..num("warmup_ratio", 0.0, 0.5, 0.1)
    },
    NumericField {
        default: None,
        optional: true,
        ..num("warmup_steps", 0.0, 10_000_000.0, 0.0)
    },
    NumericField {
        integer: false,
        ..num("weight_decay", 0.0, 1.0, 0.0)
    },
    NumericField {
        integer: false,
        exclusive_min: true,
        ..num("max_grad_norm", 0.0, 1000.0, 1.0)
    },
    NumericField {
        default: None,
        optional: true,
        integer: false,
        exclusive_min: true,
        ..num("neftune_noise_alpha", 0.0, 100.0, 0.0)
    },
    NumericField {
        default: None,
        optional: true,
        integer: false,
        exclusive_min: true,
        ..num("loraplus_lr_ratio", 0.0, 1000.0, 0.0)
    },
    NumericField {
        default: None,
        optional: true,
        ..num("freeze_trainable_layers", -1000.0, 1000.0, 0.0)
    },
    num("gpus", 0.0, 64.0, 1.0),
    num("priority", -100.0, 100.0, 0.0),
];

/// The rules of the numeric field `name` (a name from [`NUMERIC_FIELDS`]).
fn field(name: &str) -> &'static NumericField {
    NUMERIC_FIELDS
        .iter()
        .find(|f| f.name == name)
        .unwrap_or(&NUMERIC_FIELDS[0])
}

/// Everything the task form needs to know to refuse what the server would refuse.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskForm {
    pub fields: Vec<NumericField>,
    pub templates: Vec<&'static str>,
    pub stages: Vec<Stage>,
    pub finetuning_types: Vec<FinetuningType>,
    pub lr_schedulers: Vec<LrScheduler>,
    pub precisions: Vec<Precision>,
    /// Longest task name, in characters.
    pub max_name_chars: usize,
}

pub fn form() -> TaskForm {
    TaskForm {
        fields: NUMERIC_FIELDS.to_vec(),
        templates: KNOWN_TEMPLATES.to_vec(),
        stages: vec![Stage::Sft, Stage::Pt, Stage::Dpo, Stage::Kto, Stage::Rm],
        finetuning_types: vec![
            FinetuningType::Lora,
            FinetuningType::Full,
            FinetuningType::Freeze,
        ],
        lr_schedulers: vec![
            LrScheduler::Cosine,
            LrScheduler::Linear,
            LrScheduler::CosineWithRestarts,
            LrScheduler::Polynomial,
            LrScheduler::Constant,
            LrScheduler::ConstantWithWarmup,
            LrScheduler::InverseSqrt,
        ],
        precisions: vec![
            Precision::Auto,
            Precision::Bf16,
            Precision::Fp16,
            Precision::Fp32,
        ],
        max_name_chars: MAX_NAME_CHARS,
    }
}

const MAX_NAME_CHARS: usize = 100;

/// `value` (or the field's default) checked against the field's rules.
fn float(name: &str, value: Option<f64>) -> Result<f64> {
    let f = field(name);
    let v = value.or(f.default).unwrap_or(f.min);
    let lo_ok = if f.exclusive_min {
        v > f.min
    } else {
        v >= f.min
    };
    if v.is_finite() && lo_ok && v <= f.max {
        Ok(v)
    } else {
        let open = if f.exclusive_min { "(" } else { "[" };
        Err(invalid(
            name,
            format!("must be in {open}{}, {}], got {v}", f.min, f.max),
        ))
    }
}

/// An integer field checked against its rules (`value` or the field's default).
fn int<T>(name: &str, value: Option<T>) -> Result<T>
where
    T: Copy + std::fmt::Display + TryFrom<i64> + Into<f64>,
{
    let f = field(name);
    let v: f64 = match value {
        Some(v) => v.into(),
        None => f.default.unwrap_or(f.min),
    };
    if v >= f.min && v <= f.max && v.fract() == 0.0 {
        T::try_from(v as i64).map_err(|_| invalid(name, "out of range"))
    } else {
        Err(invalid(
            name,
            format!("must be between {} and {}, got {v}", f.min, f.max),
        ))
    }
}

/// A whole-number `u64` field checked against its rules.
fn whole(name: &str, value: Option<f64>) -> Result<u64> {
    let f = field(name);
    let v = value.or(f.default).unwrap_or(f.min);
    if v >= f.min && v <= f.max && v.fract() == 0.0 {
        Ok(v as u64)
    } else {
        Err(invalid(
            name,
            format!("must be between {} and {}, got {v}", f.min, f.max),
        ))
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Error {
    Error::new(Kind::Invalid, "invalid_spec", format!("{field}: {why}"))
}

/// Where a task trains, as far as its arguments care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPUs; `bf16`: all of them compute in bfloat16.
    Gpu {
        bf16: bool,
    },
}

/// LlamaFactory template names accepted in `template` (a subset of 0.9.5's registry that
/// covers the model families ferrotune serves; the check catches typos before a run).
pub const KNOWN_TEMPLATES: &[&str] = &[
    "default",
    "empty",
    "alpaca",
    "chatml",
    "smollm",
    "smollm2",
    "llama2",
    "llama3",
    "llama4",
    "mistral",
    "ministral",
    "qwen",
    "qwen2_vl",
    "qwen3",
    "qwen3_nothink",
    "gemma",
    "gemma2",
    "gemma3",
    "phi",
    "phi4",
    "deepseek",
    "deepseek3",
    "yi",
    "glm4",
    "cpm4",
    "vicuna",
    "zephyr",
];

impl TaskRequest {
    /// Validates every field and fills the defaults.
    pub fn into_spec(self) -> Result<TaskSpec> {
        let name = crate::text::clean_name(&self.name);
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return Err(invalid(
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters"),
            ));
        }
        let model_name = self.model_name.trim().to_string();
        if model_name.is_empty() {
            return Err(invalid("model_name", "is required"));
        }
        let finetuning_type = self.finetuning_type.unwrap_or_default();
        let lora_rank: u32 = int("lora_rank", self.lora_rank)?;
        let lora_target = self.lora_target.unwrap_or_else(|| "all".into());
        let lora_target = lora_target.trim().to_string();
        if lora_target.is_empty()
            || !lora_target.split(',').all(|t| {
                !t.trim().is_empty()
                    && t.trim()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            })
        {
            return Err(invalid(
                "lora_target",
                "must be `all` or a comma-separated list of module names (e.g. q_proj,v_proj)",
            ));
        }
        let template = self.template.unwrap_or_default().trim().to_string();
        if !template.is_empty() && !KNOWN_TEMPLATES.contains(&template.as_str()) {
            return Err(invalid(
                "template",
                format!(
                    "unknown template `{template}` (known: {})",
                    KNOWN_TEMPLATES.join(", ")
                ),
            ));
        }
        let system = self.system.filter(|s| !s.trim().is_empty());
        if system.as_ref().is_some_and(|s| s.len() > 32 * 1024) {
            return Err(invalid("system", "must be at most 32 KiB"));
        }
        // A u64 beyond what f64 holds exactly is far outside every range anyway.
        let wide = |v: Option<u64>| v.map(|v| v as f64);
        let seed = whole("seed", wide(self.seed))?;
        let spec = TaskSpec {
            name,
            model_name,
            epochs: float("epochs", self.epochs)?,
            learning_rate: float("learning_rate", self.learning_rate)?,
            batch_size: int("batch_size", self.batch_size)?,
            stage: self.stage.unwrap_or_default(),
            pref_loss: None,
            pref_beta: None,
            finetuning_type,
            lora_rank,
            lora_alpha: int("lora_alpha", Some(self.lora_alpha.unwrap_or(lora_rank * 2)))?,
            lora_dropout: float("lora_dropout", self.lora_dropout)?,
            lora_target,
            template,
            system,
            cutoff_len: int("cutoff_len", self.cutoff_len)?,
            val_size: float("val_size", self.val_size)?,
            seed,
            precision: self.precision.unwrap_or_default(),
            gradient_accumulation_steps: int(
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            )?,
            max_steps: self
                .max_steps
                .map(|v| whole("max_steps", Some(v as f64)))
                .transpose()?,
            save_steps: whole("save_steps", wide(self.save_steps))?,
            save_minutes: match self.save_minutes {
                Some(m) if !(m.is_finite() && m > 0.0 && m <= 1440.0) => {
                    return Err(invalid(
                        "save_minutes",
                        "must be above 0 and at most 1440 (a day)",
                    ));
                }
                other => other,
            },
            logging_steps: whole("logging_steps", wide(self.logging_steps))?,
            gpus: int("gpus", self.gpus)?,
            gpu_ids: Vec::new(),
            quantization_bit: None,
            deepspeed: None,
            priority: int("priority", self.priority)?,
            eval_dataset_id: self.eval_dataset_id.filter(|d| !d.trim().is_empty()),
            validation_dataset_id: self.validation_dataset_id.filter(|d| !d.trim().is_empty()),
            lr_scheduler_type: self.lr_scheduler_type.unwrap_or_default(),
            warmup_ratio: float("warmup_ratio", self.warmup_ratio)?,
            warmup_steps: match self.warmup_steps {
                None => None,
                some => Some(whole("warmup_steps", some)?),
            },
            weight_decay: float("weight_decay", self.weight_decay)?,
            max_grad_norm: float("max_grad_norm", self.max_grad_norm)?,
            packing: self.packing.unwrap_or(false),
            neftune_noise_alpha: match self.neftune_noise_alpha {
                None => None,
                some => Some(float("neftune_noise_alpha", some)?),
            },
            use_rslora: self.use_rslora.unwrap_or(false),
            use_dora: self.use_dora.unwrap_or(false),
            pissa: self.pissa.unwrap_or(false),
            loraplus_lr_ratio: match self.loraplus_lr_ratio {
                None => None,
                some => Some(float("loraplus_lr_ratio", some)?),
            },
            freeze_trainable_layers: match self.freeze_trainable_layers {
                None => None,
                Some(0) => {
                    return Err(invalid(
                        "freeze_trainable_layers",
                        "0 trains nothing: positive for the last layers, negative for the first",
                    ));
                }
                some => Some(int("freeze_trainable_layers", some)?),
            },
            freeze_trainable_modules: self
                .freeze_trainable_modules
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty()),
            extra_args: self.extra_args.unwrap_or_default(),
            eval_split: None,
            evaluation: None,
        };
        check_method_settings(&spec)?;
        if spec.validation_dataset_id.is_some() && spec.val_size > 0.0 {
            return Err(invalid(
                "validation_dataset_id",
                "give either val_size (held-out rows) or validation_dataset_id (a dataset)",
            ));
        }
        let mut spec = spec;
        if let Some(loss) = self.pref_loss {
            if self.stage.is_some_and(|s| s != Stage::Dpo) {
                return Err(invalid("pref_loss", "is DPO's loss: only with stage `dpo`"));
            }
            spec.pref_loss = Some(loss);
        }
        if let Some(beta) = self.pref_beta {
            if self
                .stage
                .is_some_and(|s| !matches!(s, Stage::Dpo | Stage::Kto))
            {
                return Err(invalid("pref_beta", "only with stage `dpo` or `kto`"));
            }
            if !(beta.is_finite() && beta > 0.0 && beta <= 10.0) {
                return Err(invalid("pref_beta", "must be above 0 and at most 10"));
            }
            spec.pref_beta = Some(beta);
        }
        if let Some(split) = self.eval_split {
            if !(split > 0.0 && split <= 0.5) {
                return Err(invalid(
                    "eval_split",
                    "must be above 0 and at most 0.5 (the fraction of the rows held out)",
                ));
            }
            if self.val_size.is_some_and(|v| (v - split).abs() > 1e-9) && spec.val_size > 0.0 {
                return Err(invalid(
                    "eval_split",
                    "holds out the rows `val_size` holds out: give one of them, or the same value",
                ));
            }
            if spec.eval_dataset_id.is_some() {
                return Err(invalid(
                    "eval_split",
                    "give either eval_split (held-out rows) or eval_dataset_id (a test set)",
                ));
            }
            if spec.validation_dataset_id.is_some() {
                return Err(invalid(
                    "eval_split",
                    "holds out rows for validation: give either eval_split or \
                     validation_dataset_id",
                ));
            }
            spec.val_size = split;
            spec.eval_split = Some(split);
        }
        if let Some(bits) = self.quantization_bit {
            if !matches!(bits, 4 | 8) {
                return Err(invalid("quantization_bit", "must be 4 or 8 (QLoRA)"));
            }
            if spec.finetuning_type != FinetuningType::Lora {
                return Err(invalid(
                    "quantization_bit",
                    "QLoRA quantises the frozen base under a LoRA: only with finetuning_type \
                     `lora`",
                ));
            }
            spec.quantization_bit = Some(bits);
        }
        if let Some(ids) = self.gpu_ids.filter(|ids| !ids.is_empty()) {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != ids.len() {
                return Err(invalid("gpu_ids", "a GPU is named twice"));
            }
            if ids.len() > 64 || ids.iter().any(|&i| i > 1023) {
                return Err(invalid(
                    "gpu_ids",
                    "at most 64 GPU indices, each below 1024",
                ));
            }
            if self.gpus.is_some_and(|g| g as usize != ids.len()) {
                return Err(invalid(
                    "gpu_ids",
                    format!(
                        "names {} GPU(s) but `gpus` asks for {}",
                        ids.len(),
                        spec.gpus
                    ),
                ));
            }
            spec.gpus = ids.len() as u32;
            spec.gpu_ids = ids;
        }
        if let Some(stage) = self.deepspeed {
            if !matches!(stage, 2 | 3) {
                return Err(invalid("deepspeed", "must be ZeRO stage 2 or 3"));
            }
            if spec.gpus < 2 {
                return Err(invalid(
                    "deepspeed",
                    "DeepSpeed ZeRO shards the training state across GPUs: ask for 2 or more \
                     (`gpus` or `gpu_ids`)",
                ));
            }
            spec.deepspeed = Some(stage);
        }
        Ok(spec)
    }
}

/// Fits the stage to the dataset: the one its kind trains with when the request names none;
/// a 422 naming both when they do not fit. Evaluation after training scores generated
/// answers against references, so it needs supervised data.
pub fn fit_stage(spec: &mut TaskSpec, stage_given: bool, kind: DatasetKind) -> Result<()> {
    if !stage_given {
        spec.stage = Stage::for_dataset(kind);
    }
    let stage = spec.stage;
    if stage.dataset_kind() != kind {
        let fits: Vec<&str> = Stage::fitting(kind).iter().map(Stage::as_str).collect();
        return Err(invalid(
            "stage",
            format!(
                "`{}` trains on {}, but this dataset is {}: use stage {}",
                stage.as_str(),
                stage.dataset_kind().describe(),
                kind.describe(),
                fits.join(" or ")
            ),
        ));
    }
    if spec.pref_loss.is_some() && stage != Stage::Dpo {
        return Err(invalid("pref_loss", "is DPO's loss: only with stage `dpo`"));
    }
    if spec.pref_beta.is_some() && !matches!(stage, Stage::Dpo | Stage::Kto) {
        return Err(invalid("pref_beta", "only with stage `dpo` or `kto`"));
    }
    if stage != Stage::Sft && (spec.eval_split.is_some() || spec.eval_dataset_id.is_some()) {
        return Err(invalid(
            if spec.eval_split.is_some() {
                "eval_split"
            } else {
                "eval_dataset_id"
            },
            "an evaluation scores generated answers against reference answers: only after an \
             `sft` task",
        ));
    }
    if spec.packing && !matches!(stage, Stage::Sft | Stage::Pt) {
        return Err(invalid(
            "packing",
            format!(
                "packs examples for `sft` and `pt`; `{}` compares whole examples",
                stage.as_str()
            ),
        ));
    }
    Ok(())
}

/// Settings that belong to one fine-tuning method, refused with another.
fn check_method_settings(spec: &TaskSpec) -> Result<()> {
    if spec.finetuning_type != FinetuningType::Lora {
        let lora_only = [
            ("use_rslora", spec.use_rslora),
            ("use_dora", spec.use_dora),
            ("pissa", spec.pissa),
            ("loraplus_lr_ratio", spec.loraplus_lr_ratio.is_some()),
        ];
        if let Some((name, _)) = lora_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                name,
                format!(
                    "is a LoRA setting: only with finetuning_type `lora` (not `{}`)",
                    spec.finetuning_type.as_str()
                ),
            ));
        }
    }
    if spec.finetuning_type != FinetuningType::Freeze {
        for (name, set) in [
            (
                "freeze_trainable_layers",
                spec.freeze_trainable_layers.is_some(),
            ),
            (
                "freeze_trainable_modules",
                spec.freeze_trainable_modules.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(
                    name,
                    "is a freeze-tuning setting: only with finetuning_type `freeze`",
                ));
            }
        }
    }
    if spec.pissa && spec.use_dora {
        return Err(invalid(
            "use_dora",
            "PiSSA's conversion saves an ordinary LoRA, without DoRA's magnitudes: choose one",
        ));
    }
    if spec.pissa && spec.quantization_bit.is_some() {
        return Err(invalid(
            "pissa",
            "PiSSA initialises from the full-precision weights: not with quantization_bit",
        ));
    }
    if let Some(m) = &spec.freeze_trainable_modules
        && !m.split(',').all(|p| {
            !p.trim().is_empty()
                && p.trim()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    {
        return Err(invalid(
            "freeze_trainable_modules",
            "`all`, or module names separated by commas (`mlp,self_attn`)",
        ));
    }
    Ok(())
}

/// Where a task's inputs and outputs are, resolved when it is created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunPaths {
    /// The base model's HF folder.
    pub model_dir: String,
    /// The dataset file and its shape.
    pub dataset_file: String,
    pub dataset_format: DatasetFormat,
    /// What the dataset trains (tasks from before kinds: `sft`).
    #[serde(default)]
    pub dataset_kind: DatasetKind,
    pub dataset_container: Container,
    /// Top-level fields present in the dataset's records.
    #[serde(default)]
    pub dataset_columns: Vec<String>,
    /// The task's own folder (holds `dataset_info.json`, the log, the events).
    pub task_dir: String,
    /// LlamaFactory's `output_dir`.
    pub output_dir: String,
    /// The validation dataset scored while training (`validation_dataset_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<DataFile>,
}

/// A dataset file as `dataset_info.json` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    pub file: String,
    pub format: DatasetFormat,
    pub kind: DatasetKind,
    pub container: Container,
    pub columns: Vec<String>,
}

#[cfg(test)]
impl RunPaths {
    pub fn example() -> RunPaths {
        RunPaths {
            model_dir: "/m".into(),
            dataset_file: "/d.json".into(),
            dataset_format: DatasetFormat::Alpaca,
            dataset_kind: DatasetKind::Supervised,
            dataset_container: Container::Json,
            dataset_columns: vec!["instruction".into(), "output".into()],
            task_dir: "/t".into(),
            output_dir: "/t/output".into(),
            validation: None,
        }
    }
}

/// The dataset's name in the task's `dataset_info.json`.
pub const DATASET_NAME: &str = "ferrotune_dataset";
/// The validation dataset's name there.
pub const VALIDATION_NAME: &str = "ferrotune_validation";

/// The `dataset_info.json` entry describing the dataset to LlamaFactory.
/// Optional columns are named only when the dataset has them (LlamaFactory fails on a named
/// column that no record has).
pub fn dataset_info(paths: &RunPaths) -> Value {
    let mut info = Map::new();
    let train = DataFile {
        file: paths.dataset_file.clone(),
        format: paths.dataset_format,
        kind: paths.dataset_kind,
        container: paths.dataset_container,
        columns: paths.dataset_columns.clone(),
    };
    info.insert(DATASET_NAME.into(), dataset_entry(&train));
    if let Some(v) = &paths.validation {
        info.insert(VALIDATION_NAME.into(), dataset_entry(v));
    }
    Value::Object(info)
}

/// One dataset's `dataset_info.json` entry.
fn dataset_entry(data: &DataFile) -> Value {
    let present = |c: &str| data.columns.iter().any(|k| k == c);
    let kind = data.kind;
    let mut columns = Map::new();
    // Preference pairs: LlamaFactory's `ranking` with the two answers' columns.
    let ranking = kind == DatasetKind::Preference;
    if ranking {
        columns.insert("chosen".into(), json!("chosen"));
        columns.insert("rejected".into(), json!("rejected"));
    }
    if kind == DatasetKind::Kto
        && let Some(tag) = ["kto_tag", "label"].into_iter().find(|k| present(k))
    {
        columns.insert("kto_tag".into(), json!(tag));
    }
    let mut entry = match data.format {
        DatasetFormat::Alpaca => {
            columns.insert("prompt".into(), json!("instruction"));
            if !ranking {
                columns.insert("response".into(), json!("output"));
            }
            for (role, field) in [
                ("query", "input"),
                ("system", "system"),
                ("history", "history"),
            ] {
                if present(field) {
                    columns.insert(role.into(), json!(field));
                }
            }
            json!({"file_name": data.file, "formatting": "alpaca", "columns": columns})
        }
        // Plain text: LlamaFactory's pre-training reads the prompt column alone.
        DatasetFormat::Text => {
            json!({"file_name": data.file, "formatting": "alpaca",
                   "columns": {"prompt": "text"}})
        }
        DatasetFormat::Sharegpt => {
            columns.insert("messages".into(), json!("conversations"));
            for field in ["system", "tools"] {
                if present(field) {
                    columns.insert(field.into(), json!(field));
                }
            }
            json!({"file_name": data.file, "formatting": "sharegpt", "columns": columns})
        }
        DatasetFormat::Openai => {
            columns.insert("messages".into(), json!("messages"));
            if present("tools") {
                columns.insert("tools".into(), json!("tools"));
            }
            json!({
                "file_name": data.file,
                "formatting": "sharegpt",
                "columns": columns,
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "observation_tag": "tool",
                         "function_tag": "function", "system_tag": "system"},
            })
        }
    };
    if ranking {
        entry["ranking"] = json!(true);
    }
    entry
}

/// LlamaFactory's `run_exp` arguments for a task (the keys of its HfArgumentParser; values
/// typed as it expects: real floats and ints).
pub fn llamafactory_args(spec: &TaskSpec, paths: &RunPaths, device: Device) -> Map<String, Value> {
    let mut a = Map::new();
    let mut set = |k: &str, v: Value| {
        a.insert(k.to_string(), v);
    };
    set("model_name_or_path", json!(paths.model_dir));
    set("trust_remote_code", json!(false));
    set("stage", json!(spec.stage.as_str()));
    set("do_train", json!(true));
    if matches!(spec.stage, Stage::Dpo | Stage::Kto) {
        set("pref_beta", json!(spec.pref_beta.unwrap_or(0.1)));
    }
    if spec.stage == Stage::Dpo {
        set(
            "pref_loss",
            json!(spec.pref_loss.unwrap_or_default().as_str()),
        );
    }
    set("finetuning_type", json!(spec.finetuning_type.as_str()));
    match spec.finetuning_type {
        FinetuningType::Lora => {
            set("lora_rank", json!(spec.lora_rank));
            set("lora_alpha", json!(spec.lora_alpha));
            set("lora_dropout", json!(spec.lora_dropout));
            set("lora_target", json!(spec.lora_target));
            if spec.use_rslora {
                set("use_rslora", json!(true));
            }
            if spec.use_dora {
                set("use_dora", json!(true));
            }
            if spec.pissa {
                // Saved converted to an ordinary LoRA over the unchanged base (what chat,
                // exports and other tools apply).
                set("pissa_init", json!(true));
                set("pissa_convert", json!(true));
            }
            if let Some(ratio) = spec.loraplus_lr_ratio {
                set("loraplus_lr_ratio", json!(ratio));
            }
        }
        FinetuningType::Freeze => {
            set(
                "freeze_trainable_layers",
                json!(spec.freeze_trainable_layers.unwrap_or(2)),
            );
            set(
                "freeze_trainable_modules",
                json!(spec.freeze_trainable_modules.as_deref().unwrap_or("all")),
            );
        }
        FinetuningType::Full => {}
    }
    set("dataset", json!(DATASET_NAME));
    set("dataset_dir", json!(paths.task_dir));
    set("template", json!(spec.template));
    if let Some(system) = &spec.system {
        set("default_system", json!(system));
    }
    set("cutoff_len", json!(spec.cutoff_len));
    set("overwrite_cache", json!(true));
    set("preprocessing_num_workers", json!(1));
    set("dataloader_num_workers", json!(0));
    set("output_dir", json!(paths.output_dir));
    set("logging_steps", json!(spec.logging_steps));
    set("save_steps", json!(spec.save_steps));
    set("plot_loss", json!(true));
    set("overwrite_output_dir", json!(false));
    set("save_only_model", json!(false));
    set("report_to", json!("none"));
    set("per_device_train_batch_size", json!(spec.batch_size));
    set(
        "gradient_accumulation_steps",
        json!(spec.gradient_accumulation_steps),
    );
    set("learning_rate", json!(spec.learning_rate));
    set("num_train_epochs", json!(spec.epochs));
    if let Some(max) = spec.max_steps {
        set("max_steps", json!(max));
    }
    set("lr_scheduler_type", json!(spec.lr_scheduler_type.as_str()));
    set("warmup_ratio", json!(spec.warmup_ratio));
    if let Some(steps) = spec.warmup_steps {
        set("warmup_steps", json!(steps));
    }
    set("weight_decay", json!(spec.weight_decay));
    set("max_grad_norm", json!(spec.max_grad_norm));
    if spec.packing {
        set("packing", json!(true));
    }
    if let Some(alpha) = spec.neftune_noise_alpha {
        set("neftune_noise_alpha", json!(alpha));
    }
    set("seed", json!(spec.seed));
    match (spec.precision, device) {
        (Precision::Bf16, _) | (Precision::Auto, Device::Gpu { bf16: true }) => {
            set("bf16", json!(true))
        }
        // `auto` on a GPU without bfloat16 (before Ampere: T4, V100): float16 mixed precision.
        (Precision::Fp16, _) | (Precision::Auto, Device::Gpu { bf16: false }) => {
            set("fp16", json!(true))
        }
        (Precision::Fp32, _) | (Precision::Auto, Device::Cpu) => {}
    }
    if let Some(bits) = spec.quantization_bit {
        set("quantization_bit", json!(bits));
        set("quantization_method", json!("bnb"));
    }
    if let Some(stage) = spec.deepspeed {
        set(
            "deepspeed",
            json!(
                Path::new(&paths.task_dir)
                    .join(deepspeed_config_name(stage))
                    .to_string_lossy()
            ),
        );
    }
    if spec.val_size > 0.0 {
        set("val_size", json!(spec.val_size));
        set("per_device_eval_batch_size", json!(spec.batch_size));
        set("eval_strategy", json!("steps"));
        set("eval_steps", json!(spec.save_steps));
    } else if paths.validation.is_some() {
        set("eval_dataset", json!(VALIDATION_NAME));
        set("per_device_eval_batch_size", json!(spec.batch_size));
        set("eval_strategy", json!("steps"));
        set("eval_steps", json!(spec.save_steps));
    }
    // Checked against LlamaFactory's parser when the task was created (`lf_args`); they
    // cannot replace what the task's own settings set.
    for (k, v) in &spec.extra_args {
        a.entry(k.clone()).or_insert_with(|| v.clone());
    }
    a
}

/// The `run_exp` calls a task's worker makes, in order: one for a training task; two for an
/// evaluation (the references' loss, then generated answers scored with BLEU and ROUGE:
/// LlamaFactory cannot measure both in one call, `predict_with_generate` drops the labels).
pub fn llamafactory_passes(
    spec: &TaskSpec,
    paths: &RunPaths,
    device: Device,
) -> Vec<Map<String, Value>> {
    let Some(eval) = &spec.evaluation else {
        return vec![llamafactory_args(spec, paths, device)];
    };
    let mut a = Map::new();
    let mut set = |k: &str, v: Value| {
        a.insert(k.to_string(), v);
    };
    set("model_name_or_path", json!(paths.model_dir));
    set("trust_remote_code", json!(false));
    set("stage", json!("sft"));
    set("do_train", json!(false));
    set("finetuning_type", json!("lora"));
    if let Some(adapter) = &eval.adapter_dir {
        set("adapter_name_or_path", json!(adapter));
    }
    set("dataset_dir", json!(paths.task_dir));
    match eval.split {
        // The same rows a training run with this val_size and seed held out: LlamaFactory
        // splits the raw rows with `train_test_split(test_size, seed)` before anything else.
        Some(split) => {
            set("dataset", json!(DATASET_NAME));
            set("val_size", json!(split));
        }
        None => {
            set("eval_dataset", json!(DATASET_NAME));
            if let Some(n) = eval.max_samples {
                set("max_samples", json!(n));
            }
        }
    }
    set("seed", json!(spec.seed));
    set("template", json!(spec.template));
    if let Some(system) = &spec.system {
        set("default_system", json!(system));
    }
    set("cutoff_len", json!(spec.cutoff_len));
    set("overwrite_cache", json!(true));
    set("preprocessing_num_workers", json!(1));
    set("dataloader_num_workers", json!(0));
    set("output_dir", json!(paths.output_dir));
    set("overwrite_output_dir", json!(true));
    set("report_to", json!("none"));
    set("per_device_eval_batch_size", json!(spec.batch_size));
    match (spec.precision, device) {
        (Precision::Bf16, _) | (Precision::Auto, Device::Gpu { bf16: true }) => {
            set("bf16", json!(true))
        }
        (Precision::Fp16, _) | (Precision::Auto, Device::Gpu { bf16: false }) => {
            set("fp16", json!(true))
        }
        (Precision::Fp32, _) | (Precision::Auto, Device::Cpu) => {}
    }
    let mut loss = a.clone();
    loss.insert("do_eval".into(), json!(true));
    loss.insert("predict_with_generate".into(), json!(false));
    let mut predict = a;
    predict.insert("do_predict".into(), json!(true));
    predict.insert("predict_with_generate".into(), json!(true));
    // Greedy answers: the scores must not depend on the sampler's luck.
    predict.insert("do_sample".into(), json!(false));
    predict.insert("max_new_tokens".into(), json!(eval.max_new_tokens));
    vec![loss, predict]
}

/// The DeepSpeed config's file name in the task's folder.
pub fn deepspeed_config_name(stage: u8) -> String {
    format!("ds_z{stage}_config.json")
}

/// The ZeRO config for `stage`: LlamaFactory's own `examples/deepspeed/ds_z{2,3}_config.json`
/// (batch sizes, precision and clipping left to `auto`, filled from the training arguments by
/// transformers' integration).
pub fn deepspeed_config(stage: u8) -> Value {
    let mut zero = json!({
        "stage": stage,
        "allgather_partitions": true,
        "allgather_bucket_size": 5e8,
        "overlap_comm": false,
        "reduce_scatter": true,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": true,
        "round_robin_gradients": true
    });
    if stage == 3 {
        zero = json!({
            "stage": 3,
            "overlap_comm": false,
            "contiguous_gradients": true,
            "sub_group_size": 1e9,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": true
        });
    }
    json!({
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": true,
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1
        },
        "bf16": { "enabled": "auto" },
        "zero_optimization": zero
    })
}

/// The arguments as a LlamaFactory YAML config (`llamafactory-cli train this.yaml`). Values
/// are scalars; strings are written as JSON strings, which YAML reads unchanged.
pub fn to_yaml(args: &Map<String, Value>) -> String {
    let mut out = String::from("# LlamaFactory 0.9.5 config written by ferrotune\n");
    for (k, v) in args {
        let value = match v {
            Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
            other => other.to_string(),
        };
        out.push_str(&format!("{k}: {value}\n"));
    }
    out
}

/// The LlamaFactory template for a model, from its name and `model_type` (see ENV.md):
/// SmolLM2 → `smollm2`, Llama 3 → `llama3`, Qwen2/2.5 → `qwen`, Qwen3 → `qwen3`
/// (`qwen3_nothink` for *-Instruct-2507), Mistral → `mistral`; any other model with a chat
/// template → `chatml`; a base model without one → `default`.
pub fn choose_template(
    model_name: &str,
    model_type: Option<&str>,
    has_chat_template: bool,
) -> &'static str {
    let name = model_name.to_ascii_lowercase();
    let ty = model_type.unwrap_or("").to_ascii_lowercase();
    if name.contains("smollm2") {
        "smollm2"
    } else if name.contains("smollm") {
        "smollm"
    } else if ty == "qwen3" || name.contains("qwen3") {
        if name.contains("2507") && name.contains("instruct") {
            "qwen3_nothink"
        } else {
            "qwen3"
        }
    } else if ty == "qwen2" || name.contains("qwen2") {
        "qwen"
    } else if ty == "mistral" || name.contains("mistral") {
        "mistral"
    } else if ty == "llama" && (name.contains("llama-3") || name.contains("llama3")) {
        "llama3"
    } else if ty == "llama" && (name.contains("llama-2") || name.contains("llama2")) {
        "llama2"
    } else if has_chat_template {
        "chatml"
    } else {
        "default"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: Value) -> Result<TaskSpec> {
        let mut base =
            json!({"name": "t", "model_name": "SmolLM2-135M-Instruct", "dataset_id": "x"});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let r: TaskRequest =
            serde_json::from_value(base).map_err(|e| Error::invalid(e.to_string()))?;
        r.into_spec()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let s = req(json!({})).unwrap();
        assert_eq!(s.epochs, 3.0);
        assert_eq!(s.learning_rate, 5e-5);
        assert_eq!(s.batch_size, 4);
        assert_eq!(s.stage, Stage::Sft);
        assert_eq!(s.finetuning_type, FinetuningType::Lora);
        assert_eq!(s.lora_rank, 8);
        assert_eq!(s.lora_alpha, 16);
        assert_eq!(s.lora_target, "all");
        assert_eq!(s.template, "");
    }

    #[test]
    fn out_of_range_and_unknown_values_are_refused() {
        for (bad, field) in [
            (json!({"epochs": 0}), "epochs"),
            (json!({"epochs": -1}), "epochs"),
            (json!({"learning_rate": 2.0}), "learning_rate"),
            (json!({"learning_rate": 0}), "learning_rate"),
            (json!({"batch_size": 0}), "batch_size"),
            (json!({"lora_rank": 0}), "lora_rank"),
            (json!({"lora_dropout": 1.5}), "lora_dropout"),
            (json!({"quantization_bit": 3}), "quantization_bit"),
            (
                json!({"quantization_bit": 4, "finetuning_type": "full"}),
                "quantization_bit",
            ),
            (json!({"deepspeed": 1, "gpus": 2}), "deepspeed"),
            (json!({"deepspeed": 2}), "deepspeed"),
            (json!({"deepspeed": 3, "gpus": 1}), "deepspeed"),
            (json!({"val_size": 0.9}), "val_size"),
            (json!({"cutoff_len": 1}), "cutoff_len"),
            (json!({"template": "nope"}), "template"),
            (json!({"lora_target": "q_proj; rm -rf /"}), "lora_target"),
            (json!({"name": ""}), "name"),
            (json!({"model_name": " "}), "model_name"),
            (json!({"max_steps": 0}), "max_steps"),
            (json!({"save_minutes": 0}), "save_minutes"),
            (json!({"save_minutes": 2000}), "save_minutes"),
            (json!({"priority": 1000}), "priority"),
            (json!({"seed": u64::MAX}), "seed"),
            (json!({"seed": 4_294_967_296u64}), "seed"),
        ] {
            let e = req(bad.clone())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.message.starts_with(field), "{bad}: {}", e.message);
        }
        for bad in [
            json!({"stage": "ppo"}),
            json!({"precision": "int3"}),
            json!({"bogus": 1}),
        ] {
            assert!(req(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_numeric_field_has_its_rule() {
        // Each name the validation asks for is in the table the form is served from.
        for name in [
            "epochs",
            "learning_rate",
            "batch_size",
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "cutoff_len",
            "val_size",
            "seed",
            "gradient_accumulation_steps",
            "max_steps",
            "save_steps",
            "logging_steps",
            "gpus",
            "priority",
        ] {
            assert_eq!(field(name).name, name);
        }
        let spec = req(json!({"seed": u32::MAX})).unwrap();
        assert_eq!(
            spec.seed,
            u32::MAX as u64,
            "the largest 32-bit seed is fine"
        );
        assert_eq!(form().fields.len(), NUMERIC_FIELDS.len());
    }

    fn paths(format: DatasetFormat) -> RunPaths {
        RunPaths {
            model_dir: "/m/SmolLM2".into(),
            dataset_file: "/d/x.jsonl".into(),
            dataset_format: format,
            dataset_kind: DatasetKind::Supervised,
            dataset_container: Container::Jsonl,
            dataset_columns: vec!["instruction".into(), "input".into(), "output".into()],
            task_dir: "/t/1".into(),
            output_dir: "/t/1/output".into(),
            validation: None,
        }
    }

    #[test]
    fn a_validation_dataset_is_scored_while_training() {
        let s = req(json!({"validation_dataset_id": "v1", "save_steps": 5})).unwrap();
        assert_eq!(s.validation_dataset_id.as_deref(), Some("v1"));
        let mut p = paths(DatasetFormat::Alpaca);
        p.validation = Some(DataFile {
            file: "/d/v.jsonl".into(),
            format: DatasetFormat::Openai,
            kind: DatasetKind::Supervised,
            container: Container::Jsonl,
            columns: vec!["messages".into()],
        });
        let info = dataset_info(&p);
        assert_eq!(info[DATASET_NAME]["file_name"], "/d/x.jsonl");
        assert_eq!(info[VALIDATION_NAME]["file_name"], "/d/v.jsonl");
        assert_eq!(info[VALIDATION_NAME]["columns"]["messages"], "messages");
        let a = llamafactory_args(&s, &p, Device::Cpu);
        assert_eq!(a["eval_dataset"], VALIDATION_NAME);
        assert_eq!(a["eval_strategy"], "steps");
        assert_eq!(a["eval_steps"], 5);
        assert!(a.get("val_size").is_none());
        for body in [
            json!({"validation_dataset_id": "v1", "val_size": 0.1}),
            json!({"validation_dataset_id": "v1", "eval_split": 0.1}),
        ] {
            assert!(req(body.clone()).is_err(), "{body}");
        }
        // Without one: no eval dataset.
        let a = llamafactory_args(
            &req(json!({})).unwrap(),
            &paths(DatasetFormat::Alpaca),
            Device::Cpu,
        );
        assert!(a.get("eval_dataset").is_none() && a.get("eval_strategy").is_none());
    }

    #[test]
    fn maps_to_llamafactory_arguments() {
        let mut s = req(json!({"max_steps": 8, "system": "Be brief.", "val_size": 0.1})).unwrap();
        s.template = "smollm2".into();
        let a = llamafactory_args(&s, &paths(DatasetFormat::Alpaca), Device::Cpu);
        assert_eq!(a["model_name_or_path"], "/m/SmolLM2");
        assert_eq!(a["stage"], "sft");
        assert_eq!(a["finetuning_type"], "lora");
        assert_eq!(a["lora_rank"], 8);
        assert_eq!(a["dataset"], DATASET_NAME);
        assert_eq!(a["dataset_dir"], "/t/1");
        assert_eq!(a["template"], "smollm2");
        assert_eq!(a["default_system"], "Be brief.");
        assert_eq!(a["max_steps"], 8);
        assert_eq!(a["eval_strategy"], "steps");
        assert!(a["learning_rate"].is_f64(), "a real float");
        assert!(a["num_train_epochs"].is_f64());
        assert!(a.get("bf16").is_none(), "fp32 on CPU");
        assert_eq!(
            llamafactory_args(
                &s,
                &paths(DatasetFormat::Alpaca),
                Device::Gpu { bf16: true }
            )["bf16"],
            true
        );
        let older = llamafactory_args(
            &s,
            &paths(DatasetFormat::Alpaca),
            Device::Gpu { bf16: false },
        );
        assert_eq!(older["fp16"], true, "auto on a T4 or V100: float16");
        assert!(older.get("bf16").is_none());

        let mut full = s.clone();
        full.finetuning_type = FinetuningType::Full;
        assert!(
            llamafactory_args(&full, &paths(DatasetFormat::Alpaca), Device::Cpu)
                .get("lora_rank")
                .is_none()
        );

        assert!(a.get("quantization_bit").is_none() && a.get("deepspeed").is_none());
        let q = req(json!({"quantization_bit": 4, "gpus": 2, "deepspeed": 3})).unwrap();
        let qa = llamafactory_args(
            &q,
            &paths(DatasetFormat::Alpaca),
            Device::Gpu { bf16: true },
        );
        assert_eq!(qa["quantization_bit"], 4);
        assert_eq!(qa["quantization_method"], "bnb");
        assert_eq!(qa["deepspeed"], "/t/1/ds_z3_config.json");
        let z3 = deepspeed_config(3);
        assert_eq!(z3["zero_optimization"]["stage"], 3);
        assert_eq!(z3["bf16"]["enabled"], "auto");
        assert_eq!(deepspeed_config(2)["zero_optimization"]["stage"], 2);

        let yaml = to_yaml(&a);
        assert!(yaml.contains("model_name_or_path: \"/m/SmolLM2\"\n"));
        assert!(yaml.contains("lora_rank: 8\n"));
        assert!(yaml.contains("do_train: true\n"));
    }

    #[test]
    fn preference_kto_and_text_map_to_llamafactory() {
        let mut p = paths(DatasetFormat::Sharegpt);
        p.dataset_kind = DatasetKind::Preference;
        p.dataset_columns = vec!["chosen".into(), "conversations".into(), "rejected".into()];
        let i = &dataset_info(&p)[DATASET_NAME];
        assert_eq!(i["ranking"], true);
        assert_eq!(i["columns"]["chosen"], "chosen");
        assert_eq!(i["columns"]["messages"], "conversations");
        let mut p = paths(DatasetFormat::Alpaca);
        p.dataset_kind = DatasetKind::Preference;
        let i = &dataset_info(&p)[DATASET_NAME];
        assert!(i["columns"].get("response").is_none(), "{i}");
        assert_eq!(i["columns"]["rejected"], "rejected");
        let mut p = paths(DatasetFormat::Openai);
        p.dataset_kind = DatasetKind::Kto;
        p.dataset_columns = vec!["label".into(), "messages".into()];
        let i = &dataset_info(&p)[DATASET_NAME];
        assert_eq!(i["columns"]["kto_tag"], "label");
        assert!(i.get("ranking").is_none());
        let mut p = paths(DatasetFormat::Text);
        p.dataset_kind = DatasetKind::Text;
        assert_eq!(
            dataset_info(&p)[DATASET_NAME]["columns"],
            json!({"prompt": "text"})
        );

        // The stage follows the dataset unless named; a wrong one is a 422 naming both.
        let request: TaskRequest =
            serde_json::from_value(json!({"name": "t", "model_name": "m", "pref_beta": 0.2}))
                .unwrap();
        let mut spec = request.into_spec().unwrap();
        fit_stage(&mut spec, false, DatasetKind::Preference).unwrap();
        assert_eq!(spec.stage, Stage::Dpo);
        let a = llamafactory_args(&spec, &RunPaths::example(), Device::Cpu);
        assert_eq!(
            (
                a["stage"].clone(),
                a["pref_beta"].clone(),
                a["pref_loss"].clone()
            ),
            (json!("dpo"), json!(0.2), json!("sigmoid"))
        );
        let mut spec = TaskSpec {
            stage: Stage::Sft,
            ..spec
        };
        let e = fit_stage(&mut spec, true, DatasetKind::Preference).unwrap_err();
        assert!(e.message.contains("`sft` trains on supervised data (prompts with answers), but this dataset is preference data (chosen/rejected answers): use stage dpo or rm"), "{}", e.message);
        let mut spec = TaskSpec {
            stage: Stage::Kto,
            pref_beta: None,
            ..spec
        };
        fit_stage(&mut spec, true, DatasetKind::Kto).unwrap();
        let a = llamafactory_args(&spec, &RunPaths::example(), Device::Cpu);
        assert!(a.get("pref_loss").is_none());
        assert_eq!(a["pref_beta"], 0.1);
        let bad: TaskRequest = serde_json::from_value(
            json!({"name": "t", "model_name": "m", "stage": "sft", "pref_loss": "orpo"}),
        )
        .unwrap();
        assert!(bad.into_spec().unwrap_err().message.contains("pref_loss"));
        let mut spec = TaskSpec {
            stage: Stage::Sft,
            eval_split: Some(0.2),
            ..spec
        };
        spec.stage = Stage::Pt;
        assert!(
            fit_stage(&mut spec, true, DatasetKind::Text)
                .unwrap_err()
                .message
                .contains("eval_split")
        );
    }

    #[test]
    fn dataset_info_per_format() {
        let i = dataset_info(&paths(DatasetFormat::Alpaca));
        assert_eq!(i[DATASET_NAME]["formatting"], "alpaca");
        assert_eq!(i[DATASET_NAME]["columns"]["response"], "output");
        assert_eq!(i[DATASET_NAME]["columns"]["query"], "input");
        assert!(
            i[DATASET_NAME]["columns"].get("history").is_none(),
            "absent column not named"
        );
        let i = dataset_info(&paths(DatasetFormat::Sharegpt));
        assert_eq!(i[DATASET_NAME]["columns"]["messages"], "conversations");
        let i = dataset_info(&paths(DatasetFormat::Openai));
        assert_eq!(i[DATASET_NAME]["formatting"], "sharegpt");
        assert_eq!(i[DATASET_NAME]["tags"]["role_tag"], "role");
        assert_eq!(i[DATASET_NAME]["tags"]["observation_tag"], "tool");
    }

    #[test]
    fn template_choice() {
        assert_eq!(
            choose_template("SmolLM2-135M-Instruct", Some("llama"), true),
            "smollm2"
        );
        assert_eq!(
            choose_template("Meta-Llama-3-8B-Instruct", Some("llama"), true),
            "llama3"
        );
        assert_eq!(
            choose_template("Qwen2.5-7B-Instruct", Some("qwen2"), true),
            "qwen"
        );
        assert_eq!(choose_template("Qwen3-4B", Some("qwen3"), true), "qwen3");
        assert_eq!(
            choose_template("Qwen3-4B-Instruct-2507", Some("qwen3"), true),
            "qwen3_nothink"
        );
        assert_eq!(
            choose_template("Mistral-7B-Instruct-v0.3", Some("mistral"), true),
            "mistral"
        );
        assert_eq!(
            choose_template("my-model", Some("gpt_neox"), true),
            "chatml"
        );
        assert_eq!(
            choose_template("my-base", Some("gpt_neox"), false),
            "default"
        );
    }
}
