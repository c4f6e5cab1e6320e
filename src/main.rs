//! The `hearth` command: `serve` (the default) runs the server, `user create` makes accounts.

/// Hearth's allocator (see the `mimalloc` line of `Cargo.toml` for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth::{
    accounts::Accounts,
    config::{Config, LogFormat, Registration},
    server::{Server, open_database},
};

/// A federated Matrix homeserver.
#[derive(Parser)]
#[command(name = "hearth", version, about)]
struct Cli {
    /// The TOML config file (default: the HEARTH_CONFIG variable, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage local accounts (run while the server is stopped).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account.
    Create {
        /// The localpart (`alice` for `@alice:server`).
        name: String,
        /// Its password.
        #[arg(long)]
        password: String,
        /// Make it a server admin.
        #[arg(long)]
        admin: bool,
    },
}

/// ruma's authorization checks log two lines at `info` for every event they check (the
/// sender's membership, "passed all checks"): for a server receiving thousands of PDUs a
/// second, most of its log and several percent of its time. They are kept to warnings
/// unless the configured filter names that target itself.
const RUMA_AUTH_LOG: &str = "ruma_state_res";

/// The log filter: the configured directives, with [`RUMA_AUTH_LOG`] at `warn` unless they
/// name it.
fn log_directives(configured: &str) -> String {
    if configured.contains(RUMA_AUTH_LOG) {
        configured.to_owned()
    } else if configured.trim().is_empty() {
        format!("{RUMA_AUTH_LOG}=warn")
    } else {
        format!("{configured},{RUMA_AUTH_LOG}=warn")
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(log_directives(&config.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives("info")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config).context("loading the configuration")?;
    init_logging(&config);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::User { command: UserCommand::Create { name, password, admin } } => {
            let db =
                open_database(&config).context("opening the database (is the server running?)")?;
            let accounts = Accounts::new(db, config.server_name.clone());
            let user_id = accounts.user_id_for(&name)?;
            accounts
                .create(&user_id, Some(&password), admin)
                .await
                .context("creating the account")?;
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let notice_marker = config.data_dir.join(".first-start-notice");
    let registration = config.registration;
    let server_name = config.server_name.clone();
    let server = Server::bind(config).await.context("starting the server")?;
    if registration == Registration::Closed
        && !notice_marker.exists()
        && server.accounts().all_users().map(|users| users.is_empty()).unwrap_or(false)
    {
        eprintln!(
            "\nHearth is running for {server_name} with registration closed.\n\
             Create the first (admin) account with the server stopped:\n\
             \n    hearth user create NAME --password PASSWORD --admin\n\
             \nor let people register with a token: HEARTH_REGISTRATION=token HEARTH_REGISTRATION_TOKEN=...\n"
        );
        let _ = std::fs::write(&notice_marker, b"shown\n");
    }
    server.serve(shutdown_signal()).await.context("serving")?;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn ruma_auth_logs_are_held_at_warn_unless_named() {
        assert_eq!(log_directives("info"), "info,ruma_state_res=warn");
        assert_eq!(log_directives(""), "ruma_state_res=warn");
        assert_eq!(log_directives("hearth=debug,info"), "hearth=debug,info,ruma_state_res=warn");
        assert_eq!(log_directives("info,ruma_state_res=debug"), "info,ruma_state_res=debug");
        // Every result is a filter that parses.
        for configured in ["info", "", "hearth=debug,info", "info,ruma_state_res=debug"] {
            tracing_subscriber::EnvFilter::try_new(log_directives(configured)).unwrap();
        }
    }
}
