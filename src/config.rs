//! One `Config`, layered: defaults → TOML file → `FERROTUNE_*` environment → command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every setting of the server. Field names are the TOML keys; the environment variable of a
/// field is `FERROTUNE_` + its name in upper case (e.g. `FERROTUNE_MAX_UPLOAD_BYTES`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub bind: SocketAddr,
    /// Where the store, uploaded datasets, task outputs and the JWT secret live.
    pub data_dir: PathBuf,
    /// Base models, one folder each.
    pub models_dir: PathBuf,
    /// Largest dataset upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Origins allowed by CORS. Empty: no CORS headers (the UI is same-origin). `*`: any origin.
    /// A list, or one comma-separated string (handy in the environment).
    #[serde(deserialize_with = "string_or_list")]
    pub cors_origins: Vec<String>,
    /// Lifetime of an access token (JWT), in seconds.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// Lifetime of a refresh token when the user asked to be remembered, in seconds.
    pub remember_me_ttl_secs: u64,
    /// Failed logins on one account, inside `login_window_secs`, before it is throttled.
    pub login_max_failures: u32,
    /// Failed logins from one client address, inside `login_window_secs`, before it is throttled.
    pub login_max_failures_per_ip: u32,
    /// The window over which failures are counted and how long a throttle lasts, in seconds.
    pub login_window_secs: u64,
    /// A rotated refresh token presented again within this many seconds is taken for two tabs
    /// refreshing at once; later, for theft: its whole session ends.
    pub refresh_reuse_grace_secs: u64,
    /// Accounts one client address may register inside `login_window_secs`.
    pub register_max_per_ip: u32,
    /// Most tokens one answer may generate, whatever the request asks (the model's context
    /// bounds it too).
    pub max_generation_tokens: usize,
    /// Generations that may be in progress at once on this server (generating, or waiting
    /// for a place in their model's batch); more are refused with 429.
    pub max_concurrent_generations: usize,
    /// Sequences one model advances together in each batched decoding step; more wait in a
    /// queue, in order.
    pub max_batch_sequences: usize,
    /// KV-cache memory (MiB) the sequences in one model's batch may reserve together (each
    /// reserves its prompt plus its `max_tokens`); beyond it requests wait.
    pub kv_cache_mb: usize,
    /// KV-cache memory (MiB) one model keeps of finished sequences for prompts that begin
    /// the same way (a shared system prompt, a conversation's earlier turns): those tokens
    /// are not run again. 0 turns the prefix cache off.
    pub prefix_cache_mb: usize,
    /// How the CPU's own kernels keep the KV cache: `f16` (half the memory and attention
    /// time; logits within about 1e-2 of a 32-bit cache) or `f32`.
    pub kv_cache_dtype: String,
    /// Days the audit log keeps an entry; 0 keeps them forever.
    pub audit_retention_days: u64,
    /// Attempts to deliver one event to a webhook (the first and the retries).
    pub webhook_max_attempts: u32,
    /// The wait before the first retry (ms); each next one waits twice as long.
    pub webhook_retry_base_ms: u64,
    /// How long a webhook receiver has to answer (s).
    pub webhook_timeout_secs: u64,
    /// Let webhooks reach loopback, private and link-local addresses (off: refused, so users
    /// cannot probe the server's own network through it).
    pub webhook_allow_private_addresses: bool,
    /// Alert when the data or models directory's disk has less free space than this (%).
    pub alert_disk_free_percent: f64,
    /// Alert when the host's memory in use exceeds this (%).
    pub alert_memory_percent: f64,
    /// Alert when a GPU is hotter than this (°C).
    pub alert_gpu_temperature_c: f64,
    /// Alert when a GPU's memory in use exceeds this (%).
    pub alert_gpu_memory_percent: f64,
    /// Alert when a running training worker has written nothing (not even its heartbeat,
    /// every 10 s) for this long (s); 0 turns it off. It is stopped at
    /// `heartbeat_timeout_secs`.
    pub alert_worker_silent_secs: u64,
    /// How often the alert thresholds are checked (s).
    pub alert_check_secs: u64,
    /// Generations one user may run at once; more are refused with 429.
    pub max_generations_per_user: usize,
    /// What a model's weights become at load: `auto` (a Hugging Face folder's float weights
    /// are quantised to Q8_0; GGUF files keep their formats), `q8_0`, `q4_0`, `q4_1`, `q4k`…,
    /// or `keep` (float32 for Hugging Face folders). Quantised weights are cached beside the
    /// model and memory-mapped on later loads.
    pub inference_weights: String,
    /// The same, per base model (folder name → format), e.g. `{ "Llama-3.1-8B" = "q4_0" }`.
    pub model_weights: std::collections::BTreeMap<String, String>,
    /// Where chat runs: `auto` (the first GPU when the binary is built with the `cuda`
    /// feature and one answers, else the CPU), `cpu`, or `cuda:N`.
    pub inference_device: String,
    /// Take the client address from `X-Forwarded-For` (only behind a trusted reverse proxy).
    pub trust_forwarded_for: bool,
    /// Mark the refresh-token cookie `Secure` (set when served over HTTPS).
    pub cookie_secure: bool,
    /// Signing secret for access tokens. Empty: a random secret is generated at first start
    /// and kept in `<data_dir>/jwt_secret` (mode 0600). Set it only to share tokens between
    /// several servers.
    pub jwt_secret: String,
    /// Training workers that may run at once. 0: one per GPU, or one on a CPU-only machine.
    pub max_concurrent_tasks: usize,
    /// Tasks one user may have running at once.
    pub max_running_per_user: usize,
    /// GPUs the scheduler hands out (indices for `CUDA_VISIBLE_DEVICES`). Empty: every GPU
    /// `nvidia-smi` lists. A list, or a comma-separated string (`FERROTUNE_GPU_IDS=0,1`).
    #[serde(deserialize_with = "u32_list")]
    pub gpu_ids: Vec<u32>,
    /// A running worker that reports nothing (not even its heartbeat) for this long is
    /// stopped and its task failed, in seconds.
    pub heartbeat_timeout_secs: u64,
    /// After a cancel's "stop and save" request, how long the worker may take to save and
    /// exit before it is terminated (SIGTERM, then SIGKILL 5 s later), in seconds.
    pub cancel_grace_secs: u64,
    /// Days the outputs of finished tasks are kept (a registered model keeps its own files);
    /// 0 keeps them forever.
    pub retention_days: u64,
    /// The managed Python training environment. Empty: `~/.cache/ferrotune/pyenv/<key>`
    /// (key = hash of the pinned requirements and the Python version).
    pub python_env_dir: PathBuf,
    /// Install the training environment in the background at start when it is missing.
    pub auto_setup: bool,
    /// Base model pulled at start when the models dir holds none: a catalogue name, or a hub
    /// id (`org/name[@revision]`, pulled once the training environment is ready). Empty:
    /// pull nothing.
    pub default_model: String,
    /// The Hugging Face–compatible hub that `models pull org/name` and the "Add model" form
    /// download from (a mirror, or a private hub). Empty: huggingface_hub's default
    /// (`HF_ENDPOINT`, else https://huggingface.co).
    pub hub_endpoint: String,
    /// The hub token for gated and private models. Empty: huggingface_hub's own (`HF_TOKEN`,
    /// else a saved `hf auth login`).
    pub hub_token: String,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `ferrotune=debug,info`.
    pub log: String,
    /// Log format on stderr: `text` or `json`.
    pub log_format: LogFormat,
    /// An SMTP relay for e-mail (password-reset codes, address confirmation, notices users
    /// ask for): `smtps://user:pass@host:465`, `smtp://host:587?tls=required`, or
    /// `smtp://host:25` (no TLS: a relay on this machine only); empty: no e-mail.
    pub smtp_url: String,
    /// The sender of the e-mails.
    pub smtp_from: String,
    /// How long the relay has to take one e-mail (s).
    pub smtp_timeout_secs: u64,
    /// Also write the server's log to files in `log_dir`, rotated by size.
    pub log_file: bool,
    /// The folder of the log files; empty: `<data_dir>/logs`.
    pub log_dir: String,
    /// Format of the log files: `json` (what the administrators' log viewer filters best) or
    /// `text`.
    pub log_file_format: LogFormat,
    /// A log file is rotated once it holds more than this many MiB (server and workers).
    pub log_file_max_mb: u64,
    /// Rotated files kept besides the current one (server and each worker).
    pub log_file_count: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            models_dir: PathBuf::from("./models"),
            max_upload_bytes: 100 * 1024 * 1024,
            max_json_bytes: 2 * 1024 * 1024,
            cors_origins: Vec::new(),
            access_token_ttl_secs: 60 * 60,
            refresh_token_ttl_secs: 24 * 60 * 60,
            remember_me_ttl_secs: 30 * 24 * 60 * 60,
            login_max_failures: 5,
            login_max_failures_per_ip: 20,
            login_window_secs: 15 * 60,
            refresh_reuse_grace_secs: 30,
            register_max_per_ip: 20,
            max_generation_tokens: 4096,
            max_concurrent_generations: 32,
            max_generations_per_user: 4,
            max_batch_sequences: 16,
            kv_cache_mb: 4096,
            prefix_cache_mb: 1024,
            kv_cache_dtype: "f16".into(),
            audit_retention_days: 365,
            webhook_max_attempts: 6,
            webhook_retry_base_ms: 1000,
            webhook_timeout_secs: 10,
            webhook_allow_private_addresses: false,
            alert_disk_free_percent: 10.0,
            alert_memory_percent: 90.0,
            alert_gpu_temperature_c: 85.0,
            alert_gpu_memory_percent: 95.0,
            alert_worker_silent_secs: 120,
            alert_check_secs: 60,
            inference_weights: "auto".into(),
            model_weights: std::collections::BTreeMap::new(),
            inference_device: "auto".into(),
            trust_forwarded_for: false,
            cookie_secure: false,
            jwt_secret: String::new(),
            max_concurrent_tasks: 0,
            max_running_per_user: 1,
            gpu_ids: Vec::new(),
            heartbeat_timeout_secs: 300,
            cancel_grace_secs: 30,
            retention_days: 7,
            python_env_dir: PathBuf::new(),
            auto_setup: true,
            default_model: "smollm2-135m-instruct".into(),
            hub_endpoint: String::new(),
            hub_token: String::new(),
            log: "info".into(),
            log_format: LogFormat::Text,
            smtp_url: String::new(),
            smtp_from: "ferrotune <ferrotune@localhost>".into(),
            smtp_timeout_secs: 10,
            log_file: true,
            log_dir: String::new(),
            log_file_format: LogFormat::Json,
            log_file_max_mb: 16,
            log_file_count: 5,
        }
    }
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn u32_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Text(String),
        Many(Vec<u32>),
    }
    match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => Ok(vec![n]),
        OneOrMany::Many(v) => Ok(v),
        OneOrMany::Text(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u32>().map_err(serde::de::Error::custom))
            .collect(),
    }
}

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
}

/// The config file used when `--config` / `FERROTUNE_CONFIG` names none.
pub const DEFAULT_CONFIG_FILE: &str = "ferrotune.toml";

impl Config {
    /// Loads the layers. An explicitly named file must exist; the default `ferrotune.toml` in
    /// the working directory is read only when present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    anyhow::bail!("config file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file(path));
            }
            None => {
                let default = Path::new(DEFAULT_CONFIG_FILE);
                if default.is_file() {
                    figment = figment.merge(Toml::file(default));
                }
            }
        }
        figment = figment
            // Only variables naming a setting: others (FERROTUNE_CONFIG, FERROTUNE_PASSWORD…)
            // belong to the command line.
            .merge(Env::prefixed("FERROTUNE_").filter(|key| Config::is_setting(key.as_str())))
            .merge(Serialized::globals(overrides));
        let mut config: Config = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.normalise();
        config.validate()?;
        Ok(config)
    }

    /// True when `name` (any case) is a setting's name.
    pub fn is_setting(name: &str) -> bool {
        static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let names = NAMES.get_or_init(|| match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        });
        names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    fn normalise(&mut self) {
        let origins: Vec<String> = self
            .cors_origins
            .iter()
            .flat_map(|o| o.split(','))
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect();
        self.cors_origins = origins;
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.max_upload_bytes == 0 {
            anyhow::bail!("max_upload_bytes must be greater than 0");
        }
        if self.access_token_ttl_secs == 0 || self.refresh_token_ttl_secs == 0 {
            anyhow::bail!("token lifetimes must be greater than 0");
        }
        if self.max_running_per_user == 0 || self.heartbeat_timeout_secs == 0 {
            anyhow::bail!("max_running_per_user and heartbeat_timeout_secs must be greater than 0");
        }
        if self.login_max_failures == 0 || self.login_max_failures_per_ip == 0 {
            anyhow::bail!("login failure limits must be greater than 0");
        }
        crate::inference::Requantize::parse(&self.inference_weights)
            .map_err(|e| anyhow::anyhow!("inference_weights: {e}"))?;
        for (model, w) in &self.model_weights {
            crate::inference::Requantize::parse(w)
                .map_err(|e| anyhow::anyhow!("model_weights.{model}: {e}"))?;
        }
        crate::inference::KvPrecision::parse(&self.kv_cache_dtype)
            .map_err(|e| anyhow::anyhow!("kv_cache_dtype: {e}"))?;
        crate::inference::InferenceDevice::parse(&self.inference_device)
            .and_then(|d| d.check_build())
            .map_err(|e| anyhow::anyhow!("inference_device: {e}"))?;
        if self.log_file_max_mb == 0 {
            anyhow::bail!("log_file_max_mb must be greater than 0");
        }
        if self.register_max_per_ip == 0 {
            anyhow::bail!("register_max_per_ip must be greater than 0");
        }
        if self.max_generation_tokens == 0
            || self.max_concurrent_generations == 0
            || self.max_generations_per_user == 0
            || self.max_batch_sequences == 0
            || self.kv_cache_mb == 0
        {
            anyhow::bail!(
                "max_generation_tokens, max_concurrent_generations, max_generations_per_user, \
                 max_batch_sequences and kv_cache_mb must be greater than 0"
            );
        }
        let e = &self.hub_endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            anyhow::bail!("hub_endpoint must be an http:// or https:// address");
        }
        if !self.jwt_secret.is_empty() && self.jwt_secret.len() < 32 {
            anyhow::bail!("jwt_secret must be at least 32 characters (or empty to generate one)");
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets masked, for the start-up log.
    pub fn display_masked(&self) -> String {
        let mut shown = self.clone();
        if !shown.jwt_secret.is_empty() {
            shown.jwt_secret = "********".into();
        }
        if !shown.hub_token.is_empty() {
            shown.hub_token = "********".into();
        }
        // The relay's credentials: `scheme://user:pass@host` → `scheme://********@host`.
        if let Some((scheme, rest)) = shown.smtp_url.split_once("://")
            && let Some((_, host)) = rest.rsplit_once('@')
        {
            shown.smtp_url = format!("{scheme}://********@{host}");
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }

    /// Where hub pulls download from.
    pub fn hub(&self) -> crate::models::hub::HubSettings {
        crate::models::hub::HubSettings {
            endpoint: self.hub_endpoint.trim_end_matches('/').to_string(),
            token: self.hub_token.clone(),
        }
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    pub fn datasets_dir(&self) -> PathBuf {
        self.data_dir.join("datasets")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

    /// The folder of the server's log files.
    pub fn log_dir(&self) -> PathBuf {
        if self.log_dir.trim().is_empty() {
            self.data_dir.join("logs")
        } else {
            std::path::absolute(self.log_dir.trim())
                .unwrap_or_else(|_| PathBuf::from(self.log_dir.trim()))
        }
    }

    /// The rotation of the server's log file.
    pub fn server_log(&self) -> crate::logs::Rotation {
        crate::logs::Rotation {
            path: self.log_dir().join(crate::logs::SERVER_LOG),
            max_bytes: self.log_max_bytes(),
            keep: self.log_file_count,
        }
    }

    /// Bytes a log file holds before it is rotated.
    pub fn log_max_bytes(&self) -> usize {
        usize::try_from(self.log_file_max_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    pub fn jwt_secret_path(&self) -> PathBuf {
        self.data_dir.join("jwt_secret")
    }

    /// The engine's options from the settings (validated at load).
    pub fn engine_options(&self) -> crate::inference::EngineOptions {
        use crate::inference::Requantize;
        crate::inference::EngineOptions {
            max_tokens: self.max_generation_tokens,
            device: crate::inference::InferenceDevice::parse(&self.inference_device)
                .unwrap_or_default(),
            requantize: Requantize::parse(&self.inference_weights).unwrap_or_default(),
            model_requantize: self
                .model_weights
                .iter()
                .filter_map(|(m, w)| Requantize::parse(w).ok().map(|r| (m.clone(), r)))
                .collect(),
            max_batch: self.max_batch_sequences,
            kv_cache_bytes: self.kv_cache_mb << 20,
            prefix_cache_bytes: self.prefix_cache_mb << 20,
            max_queue: self.max_concurrent_generations,
            kv_precision: crate::inference::KvPrecision::parse(&self.kv_cache_dtype)
                .unwrap_or_default(),
            ..crate::inference::EngineOptions::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn inference_device_setting() {
        use crate::inference::InferenceDevice as D;
        assert_eq!(D::parse("auto").unwrap(), D::Auto);
        assert_eq!(D::parse("CPU").unwrap(), D::Cpu);
        assert_eq!(D::parse("cuda").unwrap(), D::Cuda(0));
        assert_eq!(D::parse("cuda:3").unwrap(), D::Cuda(3));
        assert!(D::parse("cuda:x").is_err());
        assert!(D::parse("tpu").is_err());
        assert!(D::Cpu.resolve().unwrap().is_cpu());
        let mut c = Config {
            inference_device: "cuda:0".into(),
            ..Config::default()
        };
        // Without the `cuda` feature a GPU setting cannot work: refused at start.
        assert_eq!(
            c.validate().is_err(),
            !candle_core::utils::cuda_is_available()
        );
        c.inference_device = "metal".into();
        assert!(c.validate().is_err());
        c.inference_device = "cpu".into();
        assert!(c.validate().is_ok());
        assert_eq!(c.engine_options().device, D::Cpu);
    }

    #[test]
    fn kv_cache_dtype_setting() {
        use crate::inference::KvPrecision as P;
        let mut c = Config::default();
        assert_eq!(c.engine_options().kv_precision, P::Half);
        c.kv_cache_dtype = "F32".into();
        assert!(c.validate().is_ok());
        assert_eq!(c.engine_options().kv_precision, P::Full);
        c.kv_cache_dtype = "q8_0".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("kv_cache_dtype") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "custom.toml",
                "max_upload_bytes = 1000\nmodels_dir = \"/m\"\nlog = \"debug\"",
            )?;
            jail.set_env("FERROTUNE_MAX_UPLOAD_BYTES", "2000");
            jail.set_env(
                "FERROTUNE_CORS_ORIGINS",
                "http://a.example, http://b.example",
            );
            jail.set_env("FERROTUNE_CONFIG", "ignored-here.toml");
            let overrides = Overrides {
                models_dir: Some("/flag".into()),
                ..Overrides::default()
            };
            let c = Config::load(Some(Path::new("custom.toml")), &overrides)
                .map_err(|e| e.to_string())?;
            assert_eq!(c.max_upload_bytes, 2000, "env beats file");
            assert_eq!(c.models_dir, PathBuf::from("/flag"), "flag beats file");
            assert_eq!(c.log, "debug", "file beats default");
            assert_eq!(c.bind, Config::default().bind);
            assert_eq!(c.cors_origins, vec!["http://a.example", "http://b.example"]);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_uplod_bytes = 1")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("max_uplod_bytes"), "{err}");
            assert!(Config::load(Some(Path::new("nope.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked() {
        let c = Config {
            jwt_secret: "x".repeat(40),
            ..Config::default()
        };
        let shown = c.display_masked();
        assert!(!shown.contains(&"x".repeat(40)));
        assert!(shown.contains("********"));
    }
}
