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
    /// Print the effective configuration and exit.
    Config,
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
    ferrotune::telemetry::init(&config.log, config.log_format);
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
        Command::Users { command } => users(command, config).await,
    }
}

async fn users(command: UsersCommand, config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Store::open(&config.store_dir())?;
    match command {
        UsersCommand::Create {
            username,
            email,
            password,
            admin,
        } => {
            let auth = ferrotune::auth::Auth::new(store.clone(), &config)?;
            let role = if admin { Some(Role::Admin) } else { None };
            let user = auth
                .register(&username, &email, &password, role)
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
            for u in store.users()? {
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
