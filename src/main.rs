//! The command line: `run`, `check-config`, `hash-password`,
//! `redirect-url`, `authorize`, `status`, `test`.

use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailgate::config::Config;

mod commands;

/// Exit status for a bad config (EX_USAGE... EX_DATAERR is 65; sysexits'
/// EX_USAGE, 64, is what the issue and our docs promise).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "TLS IMAP/POP3 gateway: password logins in, OAuth 2.0 XOAUTH2 upstream"
)]
struct Cli {
    /// The config file.
    /// Accepted before or after the command (`mailgate status --config F`).
    #[arg(
        short,
        long,
        global = true,
        env = "MAILGATE_CONFIG",
        default_value = "/etc/mailgate/mailgate.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run,
    /// Validate the config and print a summary (secrets redacted).
    CheckConfig,
    /// Hash a local password for an account's `password_hash`. Reads the
    /// password from the terminal, or from stdin when it is not a terminal.
    HashPassword,
    /// Print the redirect URL of an integration, to register at the provider.
    RedirectUrl {
        /// The integration's name.
        integration: String,
    },
    /// Authorize an account: the 3-legged authorization-code flow (with
    /// PKCE and state), or the device flow.
    Authorize {
        /// The account's name.
        account: String,
        /// Headless: paste the URL the browser was sent to after signing in.
        #[arg(long, conflicts_with = "device")]
        paste: bool,
        /// Use the device authorization grant (RFC 8628) instead.
        #[arg(long)]
        device: bool,
        /// Open the authorization URL with xdg-open.
        #[arg(long)]
        open: bool,
        /// Suggest this user to the provider's sign-in page.
        #[arg(long)]
        login_hint: Option<String>,
    },
    /// List integrations and accounts with their token state. Exits 2 when
    /// an account needs authorization.
    Status,
    /// Test an account (or every account of an integration) end to end:
    /// token, upstream TLS connect, XOAUTH2 login, logout.
    Test {
        /// An account or integration name.
        target: String,
    },
    /// Copy every account's tokens from the file store in `state_dir` into
    /// the PostgreSQL store of `[store]`, without authorizing again. Safe
    /// to run twice: a record already there is kept, and so is one the
    /// database holds newer.
    StoreCopy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::HashPassword => hash_password(),
        Command::RedirectUrl { integration } => with_config(&cli.config, |config| {
            let Some(i) = config.integrations.get(&integration) else {
                eprintln!("mailgate: no integration named {integration:?}");
                return ExitCode::FAILURE;
            };
            match config.redirect_url(i) {
                Some(url) => {
                    println!("{url}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("mailgate: no [http] table in the config: set http.address (and http.public_url)");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Authorize {
            account,
            paste,
            device,
            open,
            login_hint,
        } => {
            init_tracing();
            with_config(&cli.config, |config| {
                block_on(commands::authorize(
                    config,
                    &account,
                    commands::AuthorizeMode {
                        paste,
                        device,
                        open,
                        login_hint,
                    },
                ))
            })
        }
        Command::StoreCopy => {
            with_config(&cli.config, |config| block_on(commands::store_copy(config)))
        }
        Command::Status => with_config(&cli.config, |config| block_on(commands::status(config))),
        Command::Test { target } => with_config(&cli.config, |config| {
            block_on(commands::test(config, &target))
        }),
        Command::CheckConfig => match Config::load(&cli.config) {
            Ok(config) => {
                print!("{}", config.summary());
                if let Some(files) = &config.certificate {
                    match mailgate::tls::file_not_after(&files.cert) {
                        Ok(not_after) => {
                            let now = mailgate::oauth::unix_now();
                            let days = (i64::try_from(not_after).unwrap_or(i64::MAX)
                                - i64::try_from(now).unwrap_or(0))
                                / 86_400;
                            println!(
                                "certificate expires: {} ({days} days)",
                                mailgate::oauth::format_time(not_after)
                            );
                            if days < 30 {
                                println!(
                                    "WARNING: the listener certificate {} expires within 30 days: renew it",
                                    files.cert.display()
                                );
                            }
                        }
                        Err(e) => eprintln!("mailgate: {e}"),
                    }
                }
                block_on(async {
                    if let Err(why) = check_store(&config).await {
                        eprintln!("mailgate: {why}");
                        return ExitCode::FAILURE;
                    }
                    println!("config OK");
                    ExitCode::SUCCESS
                })
            }
            Err(e) => config_error(&cli.config, &e),
        },
        Command::Run => {
            let config = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return config_error(&cli.config, &e),
            };
            init_tracing_for(&config.log);
            block_on(run(config, cli.config.clone()))
        }
    }
}

/// For a shared store: whether the database is reachable, and at which
/// schema version (nothing is created or migrated here).
async fn check_store(config: &Config) -> Result<(), String> {
    use mailgate::oauth::store::postgres::{Connector, SCHEMA_VERSION};
    let mailgate::config::StoreBackend::Postgres(settings) = &config.store else {
        return Ok(());
    };
    let store = Connector::new(settings, None).map_err(|e| e.to_string())?;
    if let mailgate::config::KeySource::File(key) = &config.store_key {
        if !key.exists() {
            println!(
                "store key: {} is missing: the first instance creates it while the database holds no records; every other instance needs a copy",
                key.display()
            );
        }
    }
    match store.schema_version().await {
        Ok(0) => println!(
            "store: reachable; no mailgate tables yet (`mailgate run` creates them at schema version {SCHEMA_VERSION})"
        ),
        Ok(v) if v == SCHEMA_VERSION => println!("store: reachable, schema version {v}"),
        Ok(v) if v < SCHEMA_VERSION => println!(
            "store: reachable, schema version {v}; `mailgate run` migrates it to {SCHEMA_VERSION}"
        ),
        Ok(v) => {
            return Err(format!(
                "store: schema version {v} is newer than this mailgate's ({SCHEMA_VERSION}): upgrade mailgate"
            ))
        }
        Err(e) => return Err(format!("store unreachable: {e}")),
    }
    Ok(())
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let grace = config.limits.shutdown_grace;
    let mut running = match mailgate::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "start failed");
            eprintln!("mailgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("mailgate: can't install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match Config::load(&path) {
                // Listeners and limits stay as they are; accounts and
                // integrations are replaced.
                Ok(config) => {
                    if let Err(e) = running.reload(config) {
                        tracing::error!(error = %e, "reload failed; the old configuration stays");
                    }
                }
                Err(e) => tracing::error!(error = %e, "reload: invalid configuration; the old configuration stays"),
            },
        }
    }
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: no new connections, goodbye to sessions not logged in"
    );
    running.stop(grace).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn with_config(path: &std::path::Path, f: impl FnOnce(Config) -> ExitCode) -> ExitCode {
    match Config::load(path) {
        Ok(config) => f(config),
        Err(e) => config_error(path, &e),
    }
}

/// Verifying a password hash (argon2id, 19 MiB of memory) allocates one
/// big block on whichever blocking thread runs it. glibc raises its mmap
/// threshold the first time such a block is freed, and from then on serves
/// them from that thread's arena, where freed memory stays resident: up to
/// a block per blocking thread, for good (measured: 140 MB held in one
/// arena after the first logins of 10,000 sessions). A fixed threshold
/// keeps blocks of 1 MiB and more mmapped, so they go back to the system
/// once freed; the cost is a fresh mapping per verification, small next
/// to the hash itself.
/// An operator's own setting (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`)
/// wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_big_blocks_to_the_system() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    // SAFETY: a plain foreign call with integer arguments and no memory
    // preconditions; glibc's mallopt takes the arena locks itself and is
    // thread-safe. A failure (0) leaves glibc's default in place.
    let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_big_blocks_to_the_system() {}

fn block_on(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    return_big_blocks_to_the_system();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r.block_on(future),
        Err(e) => {
            eprintln!("mailgate: can't start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(path: &std::path::Path, e: &mailgate::config::ConfigError) -> ExitCode {
    eprintln!("mailgate: config {}: {e}", path.display());
    ExitCode::from(EXIT_CONFIG)
}

fn init_tracing() {
    init_tracing_for(&mailgate::config::LogSettings {
        format: mailgate::config::LogFormat::Human,
        level: "info".into(),
    });
}

fn init_tracing_for(log: &mailgate::config::LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    if log.format == mailgate::config::LogFormat::Json {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ");
        let second = rpassword::prompt_password("Again: ");
        match (first, second) {
            (Ok(a), Ok(b)) if a == b => a,
            (Ok(_), Ok(_)) => {
                eprintln!("mailgate: the passwords differ");
                return ExitCode::FAILURE;
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("mailgate: can't read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("mailgate: can't read the password from stdin: {e}");
            return ExitCode::FAILURE;
        }
        // One trailing newline is the line ending, not the password.
        let trimmed = s
            .strip_suffix('\n')
            .map(|s| s.strip_suffix('\r').unwrap_or(s));
        trimmed.unwrap_or(&s).to_owned()
    };
    if password.is_empty() {
        eprintln!("mailgate: empty password");
        return ExitCode::FAILURE;
    }
    match mailgate::account::hash_password(password.as_bytes()) {
        Ok(hash) => {
            println!("{}", hash.expose());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailgate: {e}");
            ExitCode::FAILURE
        }
    }
}
