//! Evaluation jobs: a model a user can chat with (a base, an adapter, a full or merged model)
//! scored on a dataset — the rows a training task held out, or an uploaded test set.
//!
//! An evaluation is a task of the same queue (same scheduler, worker, events, cancel, logs)
//! whose spec carries an [`EvalSpec`]. Its worker makes two LlamaFactory `run_exp` calls:
//! `do_eval` for the references' mean token loss (perplexity), then `do_predict` with
//! `predict_with_generate`, whose `ComputeSimilarity` scores BLEU-4 (nltk) and ROUGE-1/2/L
//! (rouge-chinese over jieba's words) and which writes `generated_predictions.jsonl`. When it
//! ends, [`read_results`] adds what LlamaFactory does not measure (exact match, generated
//! tokens per second) and the scores are kept with the task.
//!
//! A base and its fine-tune evaluated on the same rows form a group (`baseline` and
//! `candidate`): [`Comparison`] lays their scores and answers side by side.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{self, EvalSpec, RunPaths, TaskSpec};
use super::{Task, TaskStatus, Training};
use crate::error::{Error, Kind, Result};
use crate::store::{EvalMetrics, ModelKind, new_id};

/// Rows of a test set evaluated when the request does not say.
pub const DEFAULT_MAX_SAMPLES: u32 = 200;
const MAX_SAMPLES_LIMIT: u32 = 100_000;
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 128;
const MAX_NEW_TOKENS_LIMIT: u32 = 4096;

/// The body of `POST /api/evaluations`. Unknown fields are refused.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationRequest {
    /// The model: a base model's name or one of your trained models' ids (as chat takes
    /// them). With `task_id` and no model: that task's model.
    pub model: Option<String>,
    /// An uploaded test set.
    pub dataset_id: Option<String>,
    /// A training task: evaluate on the rows it held out (`val_size`, same seed).
    pub task_id: Option<String>,
    /// Also evaluate the fine-tune's base on the same rows, for a before/after view
    /// (default: true for a trained model).
    pub baseline: Option<bool>,
    /// At most this many rows of a test set (default 200; a held-out split is taken whole).
    pub max_samples: Option<u32>,
    /// Longest generated answer in tokens (default 128).
    pub max_new_tokens: Option<u32>,
    /// Rows per batch (default 4).
    pub batch_size: Option<u32>,
    /// Prompt and answer tokens kept per row (default: the training task's, else 1024).
    pub cutoff_len: Option<u32>,
    pub name: Option<String>,
}

/// An evaluation as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EvaluationView {
    pub evaluation_id: String,
    pub name: String,
    pub status: TaskStatus,
    /// The model evaluated (a base model's name or a trained model's id).
    pub model: String,
    /// Its name.
    pub model_name: String,
    pub model_kind: ModelKind,
    /// The base model whose weights it uses.
    pub base_model: String,
    pub dataset_id: Option<String>,
    /// The fraction of the dataset held out (a training task's `val_size`); none: a test
    /// set, every row up to `max_samples`.
    pub split: Option<f64>,
    pub max_samples: Option<u32>,
    pub max_new_tokens: u32,
    /// The training task whose result or held-out rows it evaluates.
    pub source_task_id: Option<String>,
    /// Shared by a base and its fine-tune evaluated together.
    pub group: Option<String>,
    /// `baseline` or `candidate` in a group.
    pub role: Option<String>,
    pub progress: crate::store::Progress,
    /// 1 = next to start; only while queued.
    pub queue_position: Option<usize>,
    pub error: Option<String>,
    pub metrics: Option<EvalMetrics>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<time::OffsetDateTime>,
}

impl EvaluationView {
    /// None for a training task.
    pub fn new(
        t: &Task,
        positions: &std::collections::HashMap<String, usize>,
    ) -> Option<EvaluationView> {
        let e = t.spec.evaluation.as_ref()?;
        Some(EvaluationView {
            evaluation_id: t.task_id.clone(),
            name: t.spec.name.clone(),
            status: t.status,
            model: e.model.clone(),
            model_name: if e.model_name.is_empty() {
                e.model.clone()
            } else {
                e.model_name.clone()
            },
            model_kind: e.model_kind,
            base_model: t.spec.model_name.clone(),
            dataset_id: t.dataset_id.clone(),
            split: e.split,
            max_samples: e.max_samples,
            max_new_tokens: e.max_new_tokens,
            source_task_id: e.source_task_id.clone(),
            group: e.group.clone(),
            role: e.role.clone(),
            progress: t.progress.clone(),
            queue_position: positions.get(&t.task_id).copied(),
            error: t.error.clone(),
            metrics: t.eval_metrics.clone(),
            created_at: t.created_at,
            finished_at: t.finished_at,
        })
    }
}

/// One row of an evaluation's answers (`generated_predictions.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prediction {
    /// The prompt as the model saw it (its chat template applied).
    pub prompt: String,
    /// The model's answer.
    pub predict: String,
    /// The reference answer.
    pub label: String,
}

/// A baseline and its fine-tune on the same rows, side by side.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Comparison {
    pub baseline: EvaluationView,
    pub candidate: EvaluationView,
    /// Candidate minus baseline, per metric both have.
    pub delta: serde_json::Map<String, Value>,
    pub rows: Vec<ComparedRow>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ComparedRow {
    pub prompt: String,
    pub reference: String,
    pub baseline: String,
    pub candidate: String,
}

/// The answers file in an evaluation's output.
pub const PREDICTIONS_FILE: &str = "generated_predictions.jsonl";

/// Reads an evaluation's answers (blocking).
pub fn read_predictions(output_dir: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(output_dir.join(PREDICTIONS_FILE)).map_err(|e| {
        Error::new(
            Kind::NotFound,
            "not_found",
            format!("the evaluation's answers are not there ({e})"),
        )
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Prediction>(l).map_err(|e| {
                Error::internal(format!("{PREDICTIONS_FILE}: a line does not read: {e}"))
            })
        })
        .collect()
}

/// Trimmed, lower-cased, spacing collapsed, a final full stop dropped: how two short answers
/// are compared for exact match.
pub fn normalize_answer(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    let joined = words.join(" ").to_lowercase();
    joined
        .trim_end_matches(['.', '。', '!', '！'])
        .trim()
        .to_string()
}

fn number(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// The scores of a finished evaluation, from its output folder (blocking): LlamaFactory's
/// `predict_results.json` and `eval_results.json`, and the answers (tokenised with the
/// model's tokenizer in `tokenizer_dir` for the generation speed).
pub fn read_results(output_dir: &Path, tokenizer_dir: &Path) -> Result<EvalMetrics> {
    let read_json = |name: &str| -> Result<Value> {
        let bytes = std::fs::read(output_dir.join(name))
            .map_err(|e| Error::internal(format!("{name} is missing: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{name}: {e}")))
    };
    let predict = read_json("predict_results.json")?;
    // The loss pass may be absent in a folder made by hand; the scores stand without it.
    let eval = read_json("eval_results.json").unwrap_or(Value::Null);
    let predictions = read_predictions(output_dir)?;
    let exact = if predictions.is_empty() {
        None
    } else {
        let hits = predictions
            .iter()
            .filter(|p| normalize_answer(&p.predict) == normalize_answer(&p.label))
            .count();
        Some(round2(hits as f64 * 100.0 / predictions.len() as f64))
    };
    let runtime = number(&predict, "predict_runtime");
    let generated_tokens = tokenizers::Tokenizer::from_file(tokenizer_dir.join("tokenizer.json"))
        .inspect_err(|e| {
            tracing::warn!(dir = %tokenizer_dir.display(), error = %e, "no tokenizer to count the generated tokens with: the evaluation has no tokens/s");
        })
        .ok()
        .map(|tok| {
            predictions
                .iter()
                .map(|p| {
                    tok.encode(p.predict.as_str(), false)
                        .map_or(0, |e| e.len() as u64)
                })
                .sum::<u64>()
        });
    let eval_loss = number(&eval, "eval_loss");
    Ok(EvalMetrics {
        samples: predictions.len() as u64,
        bleu_4: number(&predict, "predict_bleu-4"),
        rouge_1: number(&predict, "predict_rouge-1"),
        rouge_2: number(&predict, "predict_rouge-2"),
        rouge_l: number(&predict, "predict_rouge-l"),
        exact_match: exact,
        eval_loss,
        perplexity: eval_loss.map(|l| round2(l.exp())),
        generated_tokens,
        tokens_per_second: match (generated_tokens, runtime) {
            (Some(n), Some(s)) if s > 0.0 => Some(round2(n as f64 / s)),
            _ => None,
        },
        samples_per_second: number(&predict, "predict_samples_per_second"),
        generation_runtime_s: runtime,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Candidate minus baseline for every metric both have.
pub fn delta(baseline: &EvalMetrics, candidate: &EvalMetrics) -> serde_json::Map<String, Value> {
    let (Ok(Value::Object(b)), Ok(Value::Object(c))) = (
        serde_json::to_value(baseline),
        serde_json::to_value(candidate),
    ) else {
        return Default::default();
    };
    c.iter()
        .filter(|(k, _)| *k != "samples")
        .filter_map(|(k, cv)| {
            let d = cv.as_f64()? - b.get(k)?.as_f64()?;
            Some((k.clone(), Value::from(round2(d))))
        })
        .collect()
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Error {
    Error::new(Kind::Invalid, "invalid_spec", format!("{field}: {why}"))
}

/// The model an evaluation runs: where its weights are and how it is prompted.
struct Target {
    model: String,
    name: String,
    kind: ModelKind,
    base_name: String,
    model_dir: std::path::PathBuf,
    adapter_dir: Option<String>,
    template: Option<String>,
    system: Option<String>,
}

/// An evaluation compares generated answers with reference answers: it needs supervised
/// data (the reference being each row's answer).
pub(crate) fn require_answers(dataset: &crate::datasets::Dataset, field: &str) -> Result<()> {
    if dataset.kind != crate::datasets::format::DatasetKind::Supervised {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_spec",
            format!(
                "{field}: `{}` is {}; an evaluation compares generated answers with reference \
                 answers and needs supervised data (prompts with answers)",
                dataset.filename,
                dataset.kind.describe()
            ),
        ));
    }
    Ok(())
}

impl Training {
    async fn eval_target(&self, owner: &str, model: &str) -> Result<Target> {
        let resolved = self.models.resolve(owner, model).await.map_err(|e| {
            if e.kind == Kind::NotFound {
                Error::new(
                    Kind::Invalid,
                    "model_not_found",
                    format!("model: {}", e.message),
                )
            } else {
                e
            }
        })?;
        let record = if resolved.kind == ModelKind::Base {
            None
        } else {
            Some(self.models.trained_model(owner, model).await?)
        };
        let model_dir = resolved.base.hf_dir.clone().ok_or_else(|| {
            Error::new(
                Kind::Invalid,
                "not_evaluable",
                format!(
                    "model: `{model}` has only GGUF weights; evaluations run in transformers — \
                     evaluate the model it was made from (or a safetensors export of it)"
                ),
            )
        })?;
        Ok(Target {
            model: model.to_string(),
            name: record
                .as_ref()
                .map_or_else(|| resolved.base.name.clone(), |r| r.name.clone()),
            kind: resolved.kind,
            base_name: record
                .as_ref()
                .map_or(resolved.base.name.clone(), |r| r.base_model.clone()),
            model_dir,
            adapter_dir: resolved
                .adapter
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            template: record.as_ref().and_then(|r| r.template.clone()),
            system: resolved.system.clone(),
        })
    }

    /// Validates an evaluation request and queues it (the baseline first, when asked):
    /// returns the evaluations queued.
    pub async fn submit_evaluation(
        &self,
        owner: &str,
        request: EvaluationRequest,
    ) -> Result<Vec<Task>> {
        let max_new_tokens = request.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        if !(1..=MAX_NEW_TOKENS_LIMIT).contains(&max_new_tokens) {
            return Err(invalid(
                "max_new_tokens",
                format!("must be 1 to {MAX_NEW_TOKENS_LIMIT}"),
            ));
        }
        let max_samples = request.max_samples.unwrap_or(DEFAULT_MAX_SAMPLES);
        if !(1..=MAX_SAMPLES_LIMIT).contains(&max_samples) {
            return Err(invalid(
                "max_samples",
                format!("must be 1 to {MAX_SAMPLES_LIMIT}"),
            ));
        }
        let batch_size = request.batch_size.unwrap_or(4);
        if !(1..=256).contains(&batch_size) {
            return Err(invalid("batch_size", "must be 1 to 256"));
        }
        if let Some(c) = request.cutoff_len
            && !(16..=131_072).contains(&c)
        {
            return Err(invalid("cutoff_len", "must be 16 to 131072"));
        }
        let source = match request.task_id.as_deref() {
            Some(id) => {
                let t = self.get(owner, id).await.map_err(|e| {
                    Error::new(
                        Kind::Invalid,
                        "task_not_found",
                        format!("task_id: {}", e.message),
                    )
                })?;
                if t.spec.evaluation.is_some() {
                    return Err(invalid("task_id", "is an evaluation, not a training task"));
                }
                Some(t)
            }
            None => None,
        };
        let model = match (&request.model, &source) {
            (Some(m), _) if !m.trim().is_empty() => m.trim().to_string(),
            (_, Some(t)) => t.model_id.clone().ok_or_else(|| {
                invalid(
                    "model",
                    format!(
                        "task {} has no model yet (it is {}); name the model to evaluate",
                        t.task_id,
                        t.status.as_str()
                    ),
                )
            })?,
            _ => {
                return Err(invalid(
                    "model",
                    "is required (or a task_id whose model to use)",
                ));
            }
        };
        let (dataset_id, split) = match (&request.dataset_id, &source) {
            (Some(d), _) if !d.trim().is_empty() => (d.trim().to_string(), None),
            (_, Some(t)) => {
                if t.spec.val_size <= 0.0 {
                    return Err(invalid(
                        "task_id",
                        format!(
                            "task {} held out no rows (val_size 0): give a dataset_id of a test set",
                            t.task_id
                        ),
                    ));
                }
                let d = t.dataset_id.clone().ok_or_else(|| {
                    invalid(
                        "task_id",
                        "that task trained on a server-side file, not an uploaded dataset: give a dataset_id",
                    )
                })?;
                (d, Some(t.spec.val_size))
            }
            _ => {
                return Err(invalid(
                    "dataset_id",
                    "is required (or a task_id whose held-out rows to use)",
                ));
            }
        };
        let candidate = self.eval_target(owner, &model).await?;
        let baseline = match request.baseline {
            Some(false) => None,
            _ if candidate.kind == ModelKind::Base => {
                if request.baseline == Some(true) {
                    return Err(invalid(
                        "baseline",
                        "the model is a base model: there is nothing before it to compare",
                    ));
                }
                None
            }
            _ => Some(
                self.eval_target(owner, &candidate.base_name)
                    .await
                    .map_err(|e| {
                        Error::new(
                            e.kind,
                            e.code,
                            format!("baseline: the fine-tune's base: {}", e.message),
                        )
                    })?,
            ),
        };
        let seed = source.as_ref().map_or(42, |t| t.spec.seed);
        let cutoff_len = request
            .cutoff_len
            .or(source.as_ref().map(|t| t.spec.cutoff_len))
            .unwrap_or(1024);
        // The baseline is prompted like the fine-tune (its template and system prompt), so
        // the two differ only in their weights.
        let template = match candidate.template.clone() {
            Some(t) => t,
            None => {
                let base = self.models.find_base(&candidate.base_name).await?;
                let dir = candidate.model_dir.clone();
                let has =
                    tokio::task::spawn_blocking(move || super::has_chat_template(&dir)).await?;
                spec::choose_template(
                    &candidate.base_name,
                    base.as_ref().and_then(|b| b.model_type.as_deref()),
                    has,
                )
                .to_string()
            }
        };
        let system = candidate.system.clone();

        let _owner = self.owners.lock(owner).await;
        let dataset = self.resolve_dataset(owner, Some(&dataset_id), None).await?;
        require_answers(&dataset, "dataset_id")?;
        let group = baseline.as_ref().map(|_| new_id());
        let mut queued = Vec::new();
        let targets: Vec<(Target, Option<&str>)> = match baseline {
            Some(b) => vec![(b, Some("baseline")), (candidate, Some("candidate"))],
            None => vec![(candidate, None)],
        };
        for (target, role) in targets {
            let label = request
                .name
                .as_deref()
                .map(crate::text::clean_name)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("Evaluate {} on {}", target.name, dataset.filename));
            let name = match role {
                Some(r) => format!("{label} ({r})"),
                None => label,
            };
            let task_id = group
                .clone()
                .filter(|_| role == Some("baseline"))
                .unwrap_or_else(new_id);
            let task_dir = self.tasks_dir().join(&task_id);
            let spec = TaskSpec {
                name: name.chars().take(200).collect(),
                model_name: target.base_name.clone(),
                epochs: 0.0,
                learning_rate: 0.0,
                batch_size,
                stage: spec::Stage::Sft,
                pref_loss: None,
                pref_beta: None,
                finetuning_type: spec::FinetuningType::Lora,
                lora_rank: 0,
                lora_alpha: 0,
                lora_dropout: 0.0,
                lora_target: String::new(),
                template: template.clone(),
                system: system.clone(),
                cutoff_len,
                val_size: split.unwrap_or(0.0),
                seed,
                precision: spec::Precision::Auto,
                gradient_accumulation_steps: 1,
                max_steps: None,
                save_steps: 0,
                save_minutes: None,
                logging_steps: 0,
                gpus: u32::from(!self.gpu_ids().is_empty()),
                gpu_ids: Vec::new(),
                quantization_bit: None,
                deepspeed: None,
                priority: source.as_ref().map_or(0, |t| t.spec.priority),
                eval_dataset_id: None,
                validation_dataset_id: None,
                lr_scheduler_type: spec::LrScheduler::default(),
                warmup_ratio: 0.0,
                warmup_steps: None,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
                packing: false,
                neftune_noise_alpha: None,
                use_rslora: false,
                use_dora: false,
                pissa: false,
                loraplus_lr_ratio: None,
                freeze_trainable_layers: None,
                freeze_trainable_modules: None,
                extra_args: Default::default(),
                eval_split: None,
                evaluation: Some(EvalSpec {
                    model: target.model.clone(),
                    model_name: target.name.clone(),
                    model_kind: target.kind,
                    adapter_dir: target.adapter_dir.clone(),
                    split,
                    max_samples: split.is_none().then_some(max_samples),
                    max_new_tokens,
                    source_task_id: source.as_ref().map(|t| t.task_id.clone()),
                    group: group.clone(),
                    role: role.map(str::to_string),
                }),
            };
            let paths = RunPaths {
                model_dir: target.model_dir.to_string_lossy().into_owned(),
                dataset_file: dataset.file_path.to_string_lossy().into_owned(),
                dataset_format: dataset.format,
                dataset_kind: dataset.kind,
                dataset_container: dataset.container,
                dataset_columns: dataset.columns.clone(),
                task_dir: task_dir.to_string_lossy().into_owned(),
                output_dir: task_dir.join("output").to_string_lossy().into_owned(),
                validation: None,
            };
            let task = Task::queued(task_id, owner, spec, Some(dataset.file_id.clone()), paths);
            match self.enqueue(task).await {
                Ok(t) => queued.push(t),
                Err(e) => {
                    // Both or neither: a baseline without its candidate compares nothing.
                    for t in &queued {
                        if let Err(c) = self.cancel(t).await {
                            tracing::warn!(task_id = %t.task_id, error = %c, "could not cancel a half-queued evaluation");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(queued)
    }

    /// The owner's evaluations, newest first.
    pub async fn evaluations(&self, owner: &str) -> Result<Vec<Task>> {
        let mut all: Vec<Task> = self
            .list(owner)
            .await?
            .into_iter()
            .filter(|t| t.spec.evaluation.is_some())
            .collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(all)
    }

    /// An evaluation of the owner's (404 for a training task or another user's).
    pub async fn evaluation(&self, viewer: &str, is_admin: bool, id: &str) -> Result<Task> {
        let t = self.get_as(viewer, is_admin, id).await?;
        if t.spec.evaluation.is_none() {
            return Err(Error::not_found("no such evaluation"));
        }
        Ok(t)
    }

    /// The group `evaluation` belongs to, side by side (409 until both have finished).
    pub async fn comparison(&self, evaluation: &Task) -> Result<Comparison> {
        let group = evaluation
            .spec
            .evaluation
            .as_ref()
            .and_then(|e| e.group.clone())
            .ok_or_else(|| {
                Error::new(
                    Kind::Conflict,
                    "no_baseline",
                    "this evaluation has no baseline: evaluate a fine-tune with `baseline: true`",
                )
            })?;
        let members: Vec<Task> = self
            .list(&evaluation.owner)
            .await?
            .into_iter()
            .filter(|t| {
                t.spec
                    .evaluation
                    .as_ref()
                    .is_some_and(|e| e.group.as_deref() == Some(group.as_str()))
            })
            .collect();
        let find = |role: &str| {
            members
                .iter()
                .find(|t| {
                    t.spec
                        .evaluation
                        .as_ref()
                        .is_some_and(|e| e.role.as_deref() == Some(role))
                })
                .cloned()
        };
        let (Some(b), Some(c)) = (find("baseline"), find("candidate")) else {
            return Err(Error::not_found(
                "the other evaluation of this pair was deleted",
            ));
        };
        for t in [&b, &c] {
            if t.status != TaskStatus::Completed {
                return Err(Error::new(
                    Kind::Conflict,
                    "not_finished",
                    format!(
                        "evaluation {} is {}: the comparison is ready once both complete",
                        t.task_id,
                        t.status.as_str()
                    ),
                ));
            }
        }
        let (bdir, cdir) = (b.output_dir().to_path_buf(), c.output_dir().to_path_buf());
        let (bp, cp) = tokio::task::spawn_blocking(move || {
            Ok::<_, Error>((read_predictions(&bdir)?, read_predictions(&cdir)?))
        })
        .await??;
        let rows = bp
            .into_iter()
            .zip(cp)
            .map(|(b, c)| ComparedRow {
                prompt: c.prompt,
                reference: c.label,
                baseline: b.predict,
                candidate: c.predict,
            })
            .collect();
        let positions = Default::default();
        let (Some(bv), Some(cv)) = (
            EvaluationView::new(&b, &positions),
            EvaluationView::new(&c, &positions),
        ) else {
            return Err(Error::internal("an evaluation without its spec"));
        };
        let delta = match (&bv.metrics, &cv.metrics) {
            (Some(bm), Some(cm)) => delta(bm, cm),
            _ => Default::default(),
        };
        Ok(Comparison {
            baseline: bv,
            candidate: cv,
            delta,
            rows,
        })
    }

    /// Queues the evaluation a completed training task asked for (`eval_dataset_id` or
    /// `eval_split`): its model and its base on the same rows.
    pub(crate) async fn evaluate_after(&self, task_id: &str) {
        let task = match self.store.tasks().get_any(task_id).await {
            Ok(Some(r)) => match Task::from_record(r) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(task_id, error = %e, "a completed task does not read");
                    return;
                }
            },
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(task_id, error = %e, "could not read a completed task");
                return;
            }
        };
        tracing::info!(
            task_id,
            status = task.status.as_str(),
            "queueing the evaluation a task asked for"
        );
        if task.status != TaskStatus::Completed
            || (task.spec.eval_dataset_id.is_none() && task.spec.eval_split.is_none())
        {
            return;
        }
        let request = EvaluationRequest {
            model: task.model_id.clone(),
            dataset_id: task.spec.eval_dataset_id.clone(),
            task_id: Some(task.task_id.clone()),
            baseline: Some(true),
            cutoff_len: Some(task.spec.cutoff_len),
            batch_size: Some(task.spec.batch_size),
            ..Default::default()
        };
        match self.submit_evaluation(&task.owner, request).await {
            Ok(evals) => tracing::info!(
                task_id,
                evaluations = evals.len(),
                "queued the evaluation the task asked for"
            ),
            Err(e) => {
                tracing::warn!(task_id, error = %e, "could not queue the evaluation the task asked for");
                self.supervisor
                    .record(
                        &task,
                        super::WorkerEvent::WorkerOutput {
                            text: format!(
                                "ferrotune: the evaluation this task asked for could not be queued: {}",
                                e.message
                            ),
                            at: Default::default(),
                        },
                        None,
                    )
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_compare_loosely() {
        assert_eq!(normalize_answer("  3 plus 4 is 7. "), "3 plus 4 is 7");
        assert_eq!(normalize_answer("3  Plus 4 is 7"), "3 plus 4 is 7");
        assert_eq!(normalize_answer("三加四等于七。"), "三加四等于七");
        assert_ne!(
            normalize_answer("3 plus 4 is 8."),
            normalize_answer("3 plus 4 is 7.")
        );
    }

    #[test]
    fn results_from_llamafactory_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("predict_results.json"),
            r#"{"predict_bleu-4": 41.5, "predict_rouge-1": 60.0, "predict_rouge-2": 40.0,
                "predict_rouge-l": 55.25, "predict_runtime": 2.0,
                "predict_samples_per_second": 1.0}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("eval_results.json"),
            r#"{"eval_loss": 0.6931}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(PREDICTIONS_FILE),
            "{\"prompt\": \"p\", \"predict\": \"3 plus 4 is 7.\", \"label\": \"3 plus 4 is 7.\"}\n\
             {\"prompt\": \"q\", \"predict\": \"no\", \"label\": \"yes\"}\n",
        )
        .unwrap();
        let m = read_results(dir.path(), dir.path()).unwrap();
        assert_eq!(m.samples, 2);
        assert_eq!(m.bleu_4, Some(41.5));
        assert_eq!(m.rouge_l, Some(55.25));
        assert_eq!(m.exact_match, Some(50.0));
        assert_eq!(m.perplexity, Some(2.0));
        // No tokenizer in the folder: no token count, the rest stands.
        assert_eq!(m.generated_tokens, None);
        let worse = EvalMetrics {
            bleu_4: Some(1.5),
            ..m.clone()
        };
        assert_eq!(delta(&worse, &m)["bleu_4"], 40.0);
        // A folder without the generation's results is an error, not zeros.
        std::fs::remove_file(dir.path().join("predict_results.json")).unwrap();
        assert!(read_results(dir.path(), dir.path()).is_err());
    }
}
