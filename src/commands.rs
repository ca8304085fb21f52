//! The admin commands: `authorize`, `status`, `test`. Logic lives in the
//! library (`oauth`, `admin`, `server::probe`); this is the printing.

use std::io::BufRead as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use mailgate::admin::{self, AdminState};
use mailgate::config::{Account, Config, Grant};
use mailgate::oauth::{
    self, format_relative as relative, format_time as when, grant, unix_now, Authorization, Flows,
    PendingFlow, Stores, Tokens,
};
use mailgate::server::probe;
use mailgate::services::{Current, Services};

pub struct AuthorizeMode {
    pub paste: bool,
    pub device: bool,
    pub open: bool,
    pub login_hint: Option<String>,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailgate: {message}");
    ExitCode::FAILURE
}

/// The store, opened once for the command, and the services around it.
async fn services(config: Arc<Config>) -> Result<(Stores, Services), ExitCode> {
    let metrics = Arc::new(mailgate::metrics::Metrics::new().map_err(fail)?);
    let stores = oauth::open_store(&config, Some(metrics.clone()))
        .await
        .map_err(fail)?;
    let services = Services::build(config, metrics, stores.tokens.clone()).map_err(fail)?;
    Ok((stores, services))
}

/// How long `authorize` waits for the browser to come back.
const AUTHORIZE_WAIT: Duration = Duration::from_secs(15 * 60);

pub async fn authorize(config: Config, name: &str, mode: AuthorizeMode) -> ExitCode {
    let config = Arc::new(config);
    let Some(account) = config.accounts.get(name).cloned() else {
        return fail(format!("no account named {name:?}"));
    };
    let (stores, services) = match services(config.clone()).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let tokens = services.tokens.clone();
    if account.grant != Grant::AuthorizationCode {
        println!("account {name} uses the {:?} grant: there is nothing to authorize; checking that a token can be had", account.grant);
        return match tokens.force_refresh(&account).await {
            Ok(_) => {
                println!("ok: got an access token");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    if mode.device {
        return authorize_device(&tokens, &account).await;
    }
    let integration = &account.integration;
    let Some(redirect) = config.redirect_url(integration) else {
        return fail("no [http] table in the config: set http.address (and http.public_url), register the redirect URL (mailgate redirect-url INTEGRATION), or use --device");
    };
    let flows = Flows::new(stores.flows.clone());
    let started = match flows
        .start(
            name,
            integration,
            &redirect,
            mode.login_hint.as_deref(),
            false,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    eprintln!(
        "Open this URL in a browser and sign in as the owner of {}:",
        account.mailbox
    );
    println!("{}", started.url);
    if mode.open {
        let _ = std::process::Command::new("xdg-open")
            .arg(started.url.as_str())
            .spawn();
    }
    let metrics = match mailgate::metrics::Metrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => return fail(e),
    };
    let state = AdminState {
        services: Current::new(services),
        metrics,
        flows: flows.clone(),
        page: match admin::page::PageState::new() {
            Ok(p) => Arc::new(p),
            Err(_) => return fail("the system's random source failed"),
        },
    };
    let outcome = if mode.paste {
        eprintln!("The provider then sends your browser to {redirect}?code=...; the page may not load. Paste that whole URL here:");
        paste_back(&state, &account, started.state.expose()).await
    } else {
        wait_for_callback(&state, started.state.expose()).await
    };
    flows.remove(started.state.expose()).await;
    match outcome {
        Ok(()) => {
            println!("account {name} is authorized");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn paste_back(
    state: &AdminState,
    account: &Account,
    expected_state: &str,
) -> Result<(), String> {
    let mut line = String::new();
    tokio::task::block_in_place(|| std::io::stdin().lock().read_line(&mut line))
        .map_err(|e| format!("can't read the URL: {e}"))?;
    let url = url::Url::parse(line.trim()).map_err(|e| format!("that is not a URL: {e}"))?;
    let query = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    let given_state = query("state");
    if given_state.as_deref() != Some(expected_state) {
        return Err(
            "the URL's state doesn't match this authorization (a URL from another attempt?)".into(),
        );
    }
    let services = state.services.get();
    oauth::flow::finish(
        &state.flows,
        &services.config,
        &services.tokens,
        &account.integration,
        query("code").as_deref(),
        given_state.as_deref(),
        query("error").as_deref(),
        query("error_description").as_deref(),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Serves the redirect URL ourselves, or, when a gateway already listens
/// there, lets it finish the flow; either way, waits for the outcome.
async fn wait_for_callback(state: &AdminState, pending_state: &str) -> Result<(), String> {
    let (_shutdown, receiver) = tokio::sync::watch::channel(false);
    let config = state.services.get().config.clone();
    match admin::bind(&config).await {
        Ok(Some((listener, address))) => {
            let tls = match config.http.as_ref().map(|h| h.tls) {
                Some(mailgate::config::HttpTls::Implicit) => {
                    let server =
                        mailgate::tls::server(config.certificate.as_ref(), &config.state_dir)
                            .map_err(|e| e.to_string())?;
                    Some(tokio_rustls::TlsAcceptor::from(server.config))
                }
                _ => None,
            };
            eprintln!("Waiting for the browser at {address} ...");
            let router = admin::router(state.clone());
            tokio::spawn(admin::serve(
                listener,
                tls,
                router,
                Duration::from_secs(10),
                receiver,
            ));
        }
        Ok(None) => return Err("no [http] table in the config".into()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!("A gateway is listening at the redirect URL; it will finish the authorization. Waiting ...");
        }
        Err(e) => return Err(e.to_string()),
    }
    let deadline = tokio::time::Instant::now() + AUTHORIZE_WAIT;
    loop {
        match state
            .flows
            .load(pending_state)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(PendingFlow {
                outcome: Some(outcome),
                ..
            }) => return outcome,
            Some(_) => {}
            None => return Err("the authorization expired".into()),
        }
        if tokio::time::Instant::now() > deadline {
            return Err("gave up waiting for the browser".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn authorize_device(tokens: &Tokens, account: &Account) -> ExitCode {
    let integration = &account.integration;
    let device = match grant::device_start(tokens.http(), integration).await {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    eprintln!(
        "On any device, open the URL below and enter the code, signing in as the owner of {}:",
        account.mailbox
    );
    println!("{}", device.verification_uri);
    println!("code: {}", device.user_code);
    let granted = match grant::device_finish(tokens.http(), integration, &device).await {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    match tokens.install(account, granted).await {
        Ok(()) => {
            println!("account {} is authorized", account.name);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub async fn status(config: Config) -> ExitCode {
    // Only the store: a status must show even when the rest of the
    // config's services (a CA file, say) can't be built.
    let store = match oauth::open_store(&config, None).await {
        Ok(s) => s.tokens,
        Err(e) => return fail(e),
    };
    let mut needs = false;
    for i in config.integrations.values() {
        println!("integration {} ({:?})", i.name, i.provider);
        if let Some(d) = &i.description {
            println!("  description:  {d}");
        }
        println!("  client id:    {}", i.client_id);
        println!(
            "  client secret: {}",
            if i.client_secret.is_some() {
                "set"
            } else {
                "not set"
            }
        );
        if let Some(expires) = i.client_secret_expires {
            println!(
                "  secret expires: {} ({})",
                when(expires),
                relative(expires)
            );
        }
        println!("  scopes:       {}", i.scopes.join(" "));
        match config.redirect_url(i) {
            Some(url) => println!("  redirect URL: {url}"),
            None => println!("  redirect URL: (no [http] table)"),
        }
    }
    for a in config.accounts.values() {
        let status = oauth::status_of(store.as_ref(), a).await;
        println!(
            "account {} (user {}, integration {}, mailbox {}, grant {:?})",
            a.name, a.username, a.integration.name, a.mailbox, a.grant
        );
        if let Some(e) = &status.store_error {
            println!("  token store:  UNREADABLE: {e}");
            needs = true;
            continue;
        }
        if let Some(expires) = status.access_token_expires {
            let state = if expires > unix_now() {
                "valid until"
            } else {
                "expired at"
            };
            println!(
                "  access token: {state} {} ({})",
                when(expires),
                relative(expires)
            );
        }
        if let Some(at) = status.last_refresh {
            println!("  last refresh: {} ({})", when(at), relative(at));
        }
        let fix = status.fix().unwrap_or_default();
        match &status.authorization {
            Authorization::NotAuthorizedYet => {
                println!(
                    "  token:        none: NEEDS AUTHORIZATION (not authorized yet), run `{fix}`"
                );
                needs = true;
            }
            Authorization::Revoked(why) => {
                println!("  NEEDS AUTHORIZATION: {why}; run `{fix}` (the old tokens are kept)");
                needs = true;
            }
            Authorization::Authorized => {
                if status.access_token_expires.is_none() && status.last_refresh.is_none() {
                    println!("  token:        none yet");
                }
                if let Some(e) = &status.last_error {
                    println!("  last error:   {e}");
                }
            }
        }
    }
    if needs {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

pub async fn test(config: Config, target: &str) -> ExitCode {
    let accounts: Vec<Arc<Account>> = match config.accounts.get(target) {
        Some(a) => vec![a.clone()],
        None if config.integrations.contains_key(target) => config
            .accounts
            .values()
            .filter(|a| a.integration.name == target)
            .cloned()
            .collect(),
        None => return fail(format!("no account or integration named {target:?}")),
    };
    if accounts.is_empty() {
        return fail(format!("integration {target} has no accounts to test"));
    }
    let timeout = config.limits.upstream_timeout;
    let (_, services) = match services(Arc::new(config)).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut ok = true;
    for account in accounts {
        println!("account {} ({})", account.name, account.mailbox);
        for step in probe::test_account(
            &services.tokens,
            &services.connectors,
            &account,
            timeout,
            &services.config.hostname,
        )
        .await
        {
            let ms = step.elapsed.as_millis();
            match step.outcome {
                Ok(what) => println!("  ok    {:<20} {ms:>6} ms  {what}", step.name),
                Err(why) => {
                    ok = false;
                    println!("  FAIL  {:<20} {ms:>6} ms  {why}", step.name);
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `mailgate store-copy`: the file store's records into PostgreSQL. A
/// record is written only where the database has none, or where the file's
/// is newer (a later successful refresh); the save is compared against the
/// version read, so a gateway refreshing meanwhile wins.
pub async fn store_copy(config: Config) -> ExitCode {
    use mailgate::config::StoreBackend;
    use mailgate::oauth::{FileStore, PgStore, TokenStore as _, Version};
    let StoreBackend::Postgres(settings) = &config.store else {
        return fail(
            "store-copy copies into the PostgreSQL store: set [store] backend = \"postgres\"",
        );
    };
    // The database first: it checks the key (the file store would create
    // a missing key file, which the database would then refuse).
    let pg = match PgStore::open(settings, &config.store_key, None).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let file = match FileStore::open(&config.state_dir, &config.store_key) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let mut failed = false;
    for name in config.accounts.keys() {
        let outcome = async {
            let Some(from) = file.read(name).map_err(|e| e.to_string())? else {
                return Ok("no record in the file store".to_owned());
            };
            let into = pg.load(name).await.map_err(|e| e.to_string())?;
            let (expected, what) = match &into {
                None => (Version(0), "copied".to_owned()),
                Some(db) if db.record == from.record => {
                    return Ok("already in the database".to_owned())
                }
                Some(db) if from.record.last_refresh > db.record.last_refresh => (
                    db.version,
                    "copied over an older record in the database".to_owned(),
                ),
                Some(_) => {
                    return Ok("kept: the database holds a newer record".to_owned());
                }
            };
            pg.save(name, &from.record, expected, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(what)
        }
        .await;
        match outcome {
            Ok(what) => println!("{name}: {what}"),
            Err(e) => {
                failed = true;
                eprintln!("{name}: {e}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
