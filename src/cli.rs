//! The command line: `run`, `check`, `route`, `init`, `demo`.

use crate::config::Config;
use crate::routing::backend_addr;
use crate::server::{self, RunMode};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `println!` without the panic when stdout is a closed pipe (`gopush route u | head -1`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The demo's configuration, embedded so that `gopush demo` needs no file.
pub const DEMO_CONFIG: &str = include_str!("../conf/demo.yaml");

/// Files written by `gopush init`, relative to the target directory.
const INIT_FILES: &[(&str, &str)] = &[
    ("conf/local.yaml", include_str!("../conf/local.yaml")),
    ("conf/develop.yaml", include_str!("../conf/develop.yaml")),
    (
        "conf/production.yaml",
        include_str!("../conf/production.yaml"),
    ),
    ("hooks/README.md", include_str!("../hooks/README.md")),
    ("hooks/uid.js", include_str!("../hooks/uid.js")),
    ("hooks/route.js", include_str!("../hooks/route.js")),
    ("hooks/admin.js", include_str!("../hooks/admin.js")),
    ("conf/tls.yaml", include_str!("../conf/tls.yaml")),
];

/// The certificate and key `conf/tls.yaml` names, made fresh by `gopush init`.
const INIT_TLS: (&str, &str) = ("conf/tls/localhost.pem", "conf/tls/localhost.key");

#[derive(Parser, Debug)]
#[command(
    name = "gopush",
    version,
    about = "uid-sticky edge proxy for Socket.IO clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run {
        /// Configuration file [default: conf/${GOPUSH_ENV:-local}.yaml]
        #[arg(short, long)]
        conf: Option<PathBuf>,
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
        /// Take over the listening sockets of a running gopush (graceful binary upgrade).
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Validate the configuration and print the pools.
    Check {
        /// Configuration file [default: conf/${GOPUSH_ENV:-local}.yaml]
        #[arg(short, long)]
        conf: Option<PathBuf>,
    },
    /// Print the backend a request of this uid goes to, decided as the proxy decides. From the
    /// configuration file (hooks run, every backend taken as healthy, no sid memory), or with
    /// --agent (implied by --sid) by asking the running agent's admin API (health, drain and the
    /// sid memory included).
    Route {
        /// The uid, exactly as the client sends it.
        uid: String,
        /// The product (pool); default pool when absent.
        #[arg(short, long)]
        product: Option<String>,
        /// The sid of a live Engine.IO session (asks the running agent, which holds the memory).
        /// An Engine.IO sid may begin with `-`.
        #[arg(long, allow_hyphen_values = true)]
        sid: Option<String>,
        /// Ask the running agent (the configuration's admin.listen, with its token).
        #[arg(long)]
        agent: bool,
        /// Configuration file [default: conf/${GOPUSH_ENV:-local}.yaml]
        #[arg(short, long)]
        conf: Option<PathBuf>,
    },
    /// Write example conf/ and hooks/ into DIR (never overwrites).
    Init {
        /// Target directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// The agent on :6003 in front of two built-in Socket.IO backends on :4000 and :4001.
    Demo,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            conf,
            daemon,
            upgrade,
        } => {
            let path = conf.unwrap_or_else(default_conf_path);
            let config = match load(Some(path.clone())) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::logging::init(daemon || config.server.daemon, config.access_log.format);
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            report(server::run(
                &config,
                Some(path),
                RunMode { daemon, upgrade },
                None,
            ))
        }
        Command::Check { conf } => {
            let path = conf.unwrap_or_else(default_conf_path);
            let config = match load(Some(path.clone())) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // Build the very snapshot the agent would run (hooks, JWT keys, rings, uid
            // sources, metrics children), so that what `check` accepts, `run` accepts.
            match crate::live::Live::new(config, Some(path)) {
                Ok(live) => {
                    print_pools(&live);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gopush: configuration error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Route {
            uid,
            product,
            sid,
            agent,
            conf,
        } => {
            let config = match load(conf) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ask = RouteQuestion {
                uid: &uid,
                product: product.as_deref(),
                sid: sid.as_deref(),
            };
            route(config, ask, agent)
        }
        Command::Init { dir } => report(init(&dir)),
        Command::Demo => demo(),
    }
}

fn default_conf_path() -> PathBuf {
    let env = std::env::var("GOPUSH_ENV").unwrap_or_else(|_| "local".into());
    PathBuf::from(format!("conf/{env}.yaml"))
}

fn load(conf: Option<PathBuf>) -> Result<Config, ExitCode> {
    let path = conf.unwrap_or_else(default_conf_path);
    Config::load(&path).map_err(|e| {
        eprintln!("gopush: configuration error: {e}");
        ExitCode::FAILURE
    })
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gopush: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_pools(live: &crate::live::Live) {
    let snapshot = live.load();
    let config = &snapshot.config;
    let listen: Vec<String> = config
        .listen
        .0
        .iter()
        .map(|e| match &e.tls {
            Some(_) => format!("{} (tls)", e.addr),
            None if e.redirect_https => format!("{} (redirects to https)", e.addr),
            None => e.addr.to_string(),
        })
        .collect();
    say!("configuration ok; listen {}", listen.join(", "));
    for listener in live.listeners().tls() {
        for cert in &listener.resolver.table().certs {
            say!(
                "tls {}: {} for {} (expires {})",
                listener.addr,
                cert.cert_file.display(),
                cert.names.join(", "),
                humantime::format_rfc3339_seconds(crate::tls::unix_to_system(cert.not_after))
            );
        }
    }
    if config.admin.enabled {
        let token = match (
            config.admin.has_authentication(),
            config.hooks.admin.is_some(),
        ) {
            (true, true) => "token and admin hook",
            (true, false) => "token set",
            (false, true) => "admin hook",
            (false, false) => "no token",
        };
        say!("admin {} ({token})", config.admin.listen);
    }
    for (name, pool) in &config.pools {
        say!("pool {name}:");
        for b in &pool.backends {
            say!("  {} weight {}", b.addr, b.weight);
        }
    }
    if let Some(hooks) = &snapshot.hooks {
        for kind in crate::hooks::HookKind::ALL {
            if let Some(f) = hooks.program().file(kind) {
                println!("hook {}: {} (compiled)", kind.name(), f.name);
            }
        }
    }
}

/// What `gopush route` asks.
struct RouteQuestion<'a> {
    uid: &'a str,
    product: Option<&'a str>,
    sid: Option<&'a str>,
}

/// What `/api/route` answers (and `gopush route` prints).
#[derive(serde::Deserialize)]
struct RouteAnswer {
    uid: String,
    via: String,
    pool: Option<String>,
    backend: Option<String>,
    failover: Option<String>,
}

fn route(config: Config, ask: RouteQuestion<'_>, agent: bool) -> ExitCode {
    if agent || ask.sid.is_some() {
        if !config.admin.enabled {
            eprintln!("gopush: asking the running agent needs its admin API (admin.enabled)");
            return ExitCode::FAILURE;
        }
        return match ask_agent(&config, &ask) {
            Ok(answer) => {
                print_route(&answer);
                say!("decided by: the running agent at {}", config.admin.listen);
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("gopush: {message}");
                ExitCode::FAILURE
            }
        };
    }
    match route_offline(config, &ask) {
        Ok(answer) => {
            print_route(&answer);
            say!("decided by: the configuration (every backend taken as healthy, no sid memory)");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("gopush: {message}");
            ExitCode::FAILURE
        }
    }
}

fn print_route(a: &RouteAnswer) {
    say!("{}", a.backend.as_deref().unwrap_or("-"));
    say!(
        "pool: {}",
        a.pool
            .as_deref()
            .unwrap_or("- (the route hook named the backend)")
    );
    say!("if it is down: {}", a.failover.as_deref().unwrap_or("none"));
    say!("via: {}", a.via);
    say!("uid: {}", a.uid);
}

/// The proxy's own decision ([`crate::decide::route`]) over the configuration alone.
fn route_offline(config: Config, ask: &RouteQuestion<'_>) -> Result<RouteAnswer, String> {
    use crate::decide::{self, Refusal};
    let uid = crate::uid::Uid::from_raw(ask.uid, config.uid.max_len).map_err(|e| match e {
        crate::uid::UidError::Invalid(why) => format!("invalid uid: {why}"),
        _ => "a uid is required".to_string(),
    })?;
    let dynamic = config.pools.values().any(|p| p.is_dynamic());
    let live = crate::live::Live::new(config, None).map_err(|e| e.to_string())?;
    if dynamic {
        // DNS / file pools: discover them once (the only I/O an offline `route` does).
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(live.refresh_discovery());
    }
    let snap = live.load();
    let decided = decide::probe_request(&snap, ask.product, ask.sid)
        .and_then(|req| decide::route(&snap, None, &req, None, &uid));
    let decision = match decided {
        Ok(d) => d,
        Err(Refusal::UnknownProduct) => {
            return Err(format!(
                "unknown product `{}`",
                ask.product.unwrap_or_default()
            ))
        }
        Err(why) => {
            let (_, _, body) = why.response(&snap);
            return Err(String::from_utf8_lossy(&body)
                .trim_end()
                .trim_start_matches("gopush: ")
                .to_string());
        }
    };
    let target = &decision.target;
    let pool = target.pool().and_then(|i| snap.router.pool_at(i));
    let failover = pool.and_then(|p| p.failover(uid.ring_key(), target.backend()));
    let show = |b: &pingora::lb::Backend| backend_addr(b).map(|a| a.to_string());
    Ok(RouteAnswer {
        uid: uid.as_str().to_string(),
        via: target.via().to_string(),
        pool: pool.map(|p| p.name().to_string()),
        backend: show(target.backend()),
        failover: failover.as_ref().and_then(show),
    })
}

/// Asks the running agent's `/api/route` (loopback HTTP/1.1, one request, short timeouts).
fn ask_agent(config: &Config, ask: &RouteQuestion<'_>) -> Result<RouteAnswer, String> {
    use std::io::{Read, Write};
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let unreachable = |e: std::io::Error| format!("no answer from the agent at {addr}: {e}");
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("uid", ask.uid);
    if let Some(p) = ask.product {
        query.append_pair(&config.product_param, p);
    }
    if let Some(s) = ask.sid {
        query.append_pair("sid", s);
    }
    let auth = config
        .admin
        .token()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /api/route?{} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n",
        query.finish()
    );
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the agent at {addr}: not an HTTP answer"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        let detail = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        return Err(format!("the agent at {addr} answered {status}: {detail}"));
    }
    serde_json::from_str(body).map_err(|e| format!("the agent at {addr}: unreadable answer: {e}"))
}

fn init(dir: &Path) -> anyhow::Result<()> {
    let (cert, key) = crate::tls::self_signed(&["localhost"]).map_err(anyhow::Error::msg)?;
    let tls_files = [(INIT_TLS.0, cert.as_str()), (INIT_TLS.1, key.as_str())];
    for rel in INIT_FILES.iter().chain(&tls_files).map(|(rel, _)| rel) {
        let path = dir.join(rel);
        if path.exists() {
            anyhow::bail!("{} exists; refusing to overwrite anything", path.display());
        }
    }
    for (rel, text) in INIT_FILES.iter().chain(&tls_files) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_private(&path, text, *rel == INIT_TLS.1)?;
        say!("wrote {}", path.display());
    }
    say!(
        "next: edit conf/local.yaml, then `gopush run` (GOPUSH_ENV picks local/develop/production)"
    );
    Ok(())
}

/// Writes `text` to `path`; a private key is readable by its owner only.
fn write_private(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    if private {
        open.mode(0o600);
    }
    open.open(path)?.write_all(text.as_bytes())
}

/// Where `gopush demo` serves https (a self-signed `localhost` certificate made at start).
const DEMO_TLS_LISTEN: &str = "0.0.0.0:6443";

/// Adds the demo's TLS listener: a fresh self-signed certificate for `localhost` in a private
/// temporary directory.
fn demo_tls(config: &mut Config) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("gopush-demo-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = crate::tls::self_signed(&["localhost"]).map_err(anyhow::Error::msg)?;
    let files = crate::config::CertificateFiles {
        cert: dir.join("localhost.pem"),
        key: dir.join("localhost.key"),
    };
    write_private(&files.cert, &cert, false)?;
    write_private(&files.key, &key, true)?;
    let mut entry = crate::config::ListenEntry::plain(DEMO_TLS_LISTEN.parse()?);
    entry.tls = Some(crate::config::TlsListen {
        certificates: vec![files],
        default: None,
        h2: true,
        handshake_timeout: std::time::Duration::from_secs(10),
        watch: std::time::Duration::from_secs(60),
    });
    config.listen.0.push(entry);
    Ok(())
}

fn demo() -> ExitCode {
    crate::logging::init(false, crate::config::LogFormat::Text);
    let mut config = match Config::from_str_named(DEMO_CONFIG, Path::new("<embedded demo config>"))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gopush: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = demo_tls(&mut config) {
        eprintln!("gopush: demo certificate: {e:#}");
        return ExitCode::FAILURE;
    }
    let addrs: Vec<_> = config
        .pools
        .values()
        .flat_map(|p| p.backends.iter().map(|b| b.addr))
        .collect();
    let _backends = match crate::demo::spawn_backends(&addrs) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gopush: demo backends: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    say!("gopush demo: open http://localhost:6003 (backends on {addrs:?})");
    say!("  or https://localhost:6443 (HTTP/2; a self-signed certificate made now: the browser asks you to accept it)");
    report(server::run(
        &config,
        None,
        RunMode::default(),
        Some(crate::demo::PAGE_HTML),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_hooks_that_load_with_the_configuration() {
        let dir = std::env::temp_dir().join(format!("gopush-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir).unwrap();
        for f in [
            "hooks/uid.js",
            "hooks/route.js",
            "hooks/admin.js",
            "conf/local.yaml",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        // Turning the hooks on, as conf/local.yaml's comment says, gives a configuration that
        // loads (the hooks compile) and routes product `test` by the function.
        let local = std::fs::read_to_string(dir.join("conf/local.yaml")).unwrap();
        assert!(local.contains("#   uid: ../hooks/uid.js"), "{local}");
        let yaml = "pools: {default: {backends: [\"127.0.0.1:4000\", \"127.0.0.1:4001\"]}}\nhooks: {uid: ../hooks/uid.js, route: ../hooks/route.js, admin: ../hooks/admin.js}\n";
        std::fs::write(dir.join("conf/hooks.yaml"), yaml).unwrap();
        let config = Config::load(&dir.join("conf/hooks.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let live = crate::live::Live::new(config, None).unwrap_or_else(|e| panic!("{e}"));
        assert!(live.load().hooks.is_some());
        // The TLS example loads with the certificate init made for this machine: its own key
        // (owner-only), a leaf for localhost.
        use std::os::unix::fs::PermissionsExt;
        let key_mode = std::fs::metadata(dir.join(INIT_TLS.1))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o077, 0, "key mode {key_mode:o}");
        let tls = Config::load(&dir.join("conf/tls.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let live = crate::live::Live::new(tls, None).unwrap_or_else(|e| panic!("{e}"));
        let listener = live.listeners().tls().next().expect("a TLS listener");
        assert_eq!(listener.resolver.table().certs[0].names, vec!["localhost"]);
        // init never overwrites.
        assert!(init(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
