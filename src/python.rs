//! The `ferrotune._native` extension module (cargo feature `python`, built by maturin): the
//! candle chat engine for Python. `python/ferrotune/` re-exports it beside the REST client.
//!
//! Generation runs on the engine's own threads; Python waits for each piece with the GIL
//! released, and checks for Ctrl-C between pieces. Engine errors become the exception classes
//! of `ferrotune.errors` (looked up when raised, so the module also loads on its own).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};

use crate::inference::{
    ChatMessage, EngineError, FinishReason, GenEvent, GenerateRequest, Generation, SamplingParams,
};

/// An exception of `ferrotune.errors` by class name; `RuntimeError` when that module is
/// missing (the native module imported without its package).
fn error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let ty = py
        .import("ferrotune.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match ty {
        Ok(ty) => PyErr::from_type(ty, message),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

fn engine_error(py: Python<'_>, e: EngineError) -> PyErr {
    let class = match &e {
        EngineError::NotFound(_) => "ModelNotFoundError",
        EngineError::Invalid(_) => "InvalidRequestError",
        EngineError::Unsupported(_) => "UnsupportedError",
        // The model's queue is full: a plain error the caller may retry.
        EngineError::Internal(_) | EngineError::Busy(_) => "FerrotuneError",
    };
    error(py, class, e.to_string())
}

fn invalid(py: Python<'_>, message: String) -> PyErr {
    error(py, "InvalidRequestError", message)
}

/// `messages`: a list of `{"role", "content"}` mappings (or `(role, content)` pairs), or one
/// string, which is a single user message.
fn parse_messages(py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    if let Ok(s) = messages.cast::<PyString>() {
        return Ok(vec![ChatMessage::new("user", s.to_str()?)]);
    }
    if messages.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err(
            "messages must be a list of {\"role\", \"content\"} dicts, not one dict",
        ));
    }
    let items: Vec<Bound<'_, PyAny>> = messages
        .try_iter()
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "messages must be a list of {{\"role\", \"content\"}} dicts, not {}",
                type_name(messages)
            ))
        })?
        .collect::<PyResult<_>>()?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (role, content) = if let Ok(d) = item.cast::<PyDict>() {
            let field = |name: &str| -> PyResult<String> {
                let v = d
                    .get_item(name)?
                    .ok_or_else(|| invalid(py, format!("messages[{i}] has no \"{name}\"")))?;
                v.extract::<String>().map_err(|_| {
                    invalid(
                        py,
                        format!(
                            "messages[{i}][\"{name}\"] must be a string, not {}",
                            type_name(&v)
                        ),
                    )
                })
            };
            (field("role")?, field("content")?)
        } else if let Ok(t) = item.cast::<PyTuple>() {
            t.extract::<(String, String)>().map_err(|_| {
                invalid(
                    py,
                    format!("messages[{i}] must be a (role, content) pair of strings"),
                )
            })?
        } else {
            return Err(PyTypeError::new_err(format!(
                "messages[{i}] must be a {{\"role\", \"content\"}} dict, not {}",
                type_name(item)
            )));
        };
        // The same roles as the HTTP API (`developer` is a system message).
        let Some(role) = crate::chat::normalize_role(&role) else {
            return Err(invalid(
                py,
                format!(
                    "messages[{i}] has role \"{role}\"; expected system, developer, user, \
                     assistant or tool"
                ),
            ));
        };
        out.push(ChatMessage::new(role, content));
    }
    if out.is_empty() {
        return Err(invalid(py, "messages is empty".into()));
    }
    Ok(out)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `stop`: one string or a list of strings.
fn parse_stop(stop: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    match stop {
        None => Ok(Vec::new()),
        Some(s) if s.is_none() => Ok(Vec::new()),
        Some(s) => {
            if let Ok(one) = s.cast::<PyString>() {
                return Ok(vec![one.to_str()?.to_string()]);
            }
            s.extract::<Vec<String>>()
                .map_err(|_| PyTypeError::new_err("stop must be a string or a list of strings"))
        }
    }
}

/// Local chat with the models of a models directory (the server's `models_dir`), on this
/// machine's CPU, through the same candle engine the server uses.
///
/// `models_dir` defaults to the server's setting: `FERROTUNE_MODELS_DIR`, else `models_dir` in
/// `ferrotune.toml` (or the file `FERROTUNE_CONFIG` names), else `./models`.
#[pyclass(module = "ferrotune._native", name = "Engine", frozen)]
struct PyEngine {
    engine: Arc<crate::inference::Engine>,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (models_dir=None, weights=None, kv_cache_dtype=None))]
    fn new(
        py: Python<'_>,
        models_dir: Option<PathBuf>,
        weights: Option<String>,
        kv_cache_dtype: Option<String>,
    ) -> PyResult<Self> {
        let file = std::env::var_os("FERROTUNE_CONFIG").map(PathBuf::from);
        let mut config = crate::config::Config::load(file.as_deref(), &Default::default())
            .map_err(|e| error(py, "FerrotuneError", format!("{e:#}")))?;
        if let Some(w) = weights {
            crate::inference::Requantize::parse(&w)
                .map_err(|e| PyValueError::new_err(format!("weights: {e:#}")))?;
            config.inference_weights = w;
            config.model_weights.clear();
        }
        if let Some(k) = kv_cache_dtype {
            crate::inference::KvPrecision::parse(&k)
                .map_err(|e| PyValueError::new_err(format!("kv_cache_dtype: {e:#}")))?;
            config.kv_cache_dtype = k;
        }
        let dir = models_dir.unwrap_or_else(|| config.models_dir.clone());
        Ok(PyEngine {
            engine: crate::inference::Engine::new(dir, config.engine_options()),
        })
    }

    /// How this engine's models keep their KV caches: `"f16"` or `"f32"`.
    #[getter]
    fn kv_cache_dtype(&self) -> &'static str {
        self.engine.kv_precision().name()
    }

    /// The models directory this engine reads.
    #[getter]
    fn models_dir(&self) -> PathBuf {
        self.engine.models_dir().to_path_buf()
    }

    /// The base models in the models directory (folder names), sorted.
    fn models(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let dir = self.engine.models_dir().to_path_buf();
        let registry = self.engine.registry().clone();
        let found = py.detach(move || registry.base_models_blocking());
        let models = found.map_err(|e| {
            error(
                py,
                "FerrotuneError",
                format!("cannot read the models directory {}: {e}", dir.display()),
            )
        })?;
        Ok(models.iter().map(|m| m.name.clone()).collect())
    }

    /// Answers `messages` with `model` (a base model's folder name), optionally through a LoRA
    /// `adapter` folder. Returns the answer, or with `stream=True` a `ChatStream` iterator of
    /// text pieces. `temperature=0` is greedy; the same `seed` gives the same text.
    #[pyo3(signature = (
        model, messages, *, adapter=None, temperature=0.7, top_p=1.0, max_tokens=256, seed=None,
        stop=None, stream=false, top_k=None, repetition_penalty=1.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        model: String,
        messages: &Bound<'_, PyAny>,
        adapter: Option<PathBuf>,
        temperature: f64,
        top_p: f64,
        max_tokens: usize,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        stream: bool,
        top_k: Option<usize>,
        repetition_penalty: f32,
    ) -> PyResult<Py<PyAny>> {
        let messages = parse_messages(py, messages)?;
        if let Some(dir) = adapter.as_ref().filter(|d| !d.is_dir()) {
            return Err(invalid(
                py,
                format!("no adapter folder at {}", dir.display()),
            ));
        }
        let req = GenerateRequest {
            model_dir: crate::inference::model_dir_of(&model),
            base_model: model,
            adapter,
            messages,
            tools: Vec::new(),
            params: SamplingParams {
                temperature,
                top_p,
                top_k,
                repetition_penalty,
                seed,
                max_tokens,
                stop: parse_stop(stop)?,
                ..SamplingParams::default()
            },
            prompt: None,
        };
        let engine = self.engine.clone();
        // Reads the tokenizer, template and adapter files on first use: not under the GIL.
        let generation = py
            .detach(move || engine.generate(req))
            .map_err(|e| engine_error(py, e))?;
        let stream_obj = ChatStream::new(generation);
        if stream {
            return Ok(Py::new(py, stream_obj)?.into_any());
        }
        let mut text = String::new();
        while let Some(piece) = stream_obj.next_piece(py)? {
            text.push_str(&piece);
        }
        Ok(PyString::new(py, &text).into_any().unbind())
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(models_dir={:?})",
            self.engine.models_dir().display().to_string()
        )
    }
}

/// What a stream has received so far.
struct StreamState {
    /// `None` once the generation has ended (or was closed).
    events: Option<tokio::sync::mpsc::Receiver<GenEvent>>,
    /// Pieces received but not yet handed out (one wait may bring several).
    pending: std::collections::VecDeque<String>,
    finish_reason: Option<FinishReason>,
    completion_tokens: Option<usize>,
    /// A failure to raise once the pending pieces are out.
    error: Option<String>,
}

/// The text pieces of a streaming chat, in order. Iterating waits for each with the GIL
/// released. After the last piece, `finish_reason` (`"stop"` or `"length"`) and `usage` are
/// set. `close()` (or dropping the stream) stops the generation.
#[pyclass(module = "ferrotune._native", frozen)]
struct ChatStream {
    prompt_tokens: usize,
    state: Mutex<StreamState>,
}

impl ChatStream {
    fn new(generation: Generation) -> Self {
        ChatStream {
            prompt_tokens: generation.prompt_tokens,
            state: Mutex::new(StreamState {
                events: Some(generation.events),
                pending: Default::default(),
                finish_reason: None,
                completion_tokens: None,
                error: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next piece, `None` at the end. Waits without the GIL; a pending signal (Ctrl-C)
    /// raises and stops the generation.
    fn next_piece(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            if let Some(piece) = self.lock().pending.pop_front() {
                return Ok(Some(piece));
            }
            if let Some(message) = self.lock().error.take() {
                return Err(error(py, "FerrotuneError", message));
            }
            if self.lock().events.is_none() {
                return Ok(None);
            }
            py.detach(|| self.receive());
            if let Err(e) = py.check_signals() {
                self.lock().events = None;
                return Err(e);
            }
        }
    }

    /// Waits for at least one event, then takes whatever else has arrived.
    fn receive(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(events) = state.events.as_mut() else {
            return;
        };
        let mut next = events.blocking_recv();
        while let Some(event) = next {
            match event {
                GenEvent::Text(t) => state.pending.push_back(t),
                // Not asked for here.
                GenEvent::Token(_) | GenEvent::Prompt(_) => {}
                GenEvent::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                } => {
                    state.finish_reason = Some(finish_reason);
                    state.completion_tokens = Some(completion_tokens);
                    state.events = None;
                    return;
                }
                GenEvent::Error(e) => {
                    state.error = Some(e);
                    state.events = None;
                    return;
                }
            }
            next = events.try_recv().ok();
            if next.is_none() {
                return;
            }
        }
        // The sender is gone without a last event.
        state.error = Some("the generation ended without a result".into());
        state.events = None;
    }
}

#[pymethods]
impl ChatStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.next_piece(py)
    }

    /// Stops the generation; the stream ends.
    fn close(&self) {
        let mut state = self.lock();
        state.events = None;
        state.pending.clear();
    }

    /// `"stop"` (end of answer or a stop string) or `"length"` (`max_tokens`), once the stream
    /// is exhausted; `None` before.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.lock().finish_reason.map(FinishReason::as_str)
    }

    /// `{"prompt_tokens", "completion_tokens", "total_tokens"}` once the stream is exhausted;
    /// `None` before.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(completion) = self.lock().completion_tokens else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", self.prompt_tokens)?;
        d.set_item("completion_tokens", completion)?;
        d.set_item("total_tokens", self.prompt_tokens + completion)?;
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        let state = self.lock();
        match state.finish_reason {
            Some(r) => format!("<ChatStream finished: {}>", r.as_str()),
            None if state.events.is_some() => "<ChatStream running>".into(),
            None => "<ChatStream closed>".into(),
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<ChatStream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
