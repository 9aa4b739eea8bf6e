//! The command line: `run`, `check`, `route`, `init`, `demo`.

use crate::config::Config;
use crate::routing::{backend_addr, Router};
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
];

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
    /// Print the backend a uid maps to (offline: every backend assumed healthy).
    Route {
        /// The uid, exactly as the client sends it.
        uid: String,
        /// The product (pool); default pool when absent.
        #[arg(short, long)]
        product: Option<String>,
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
            let config = match load(conf) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print_pools(&config);
            ExitCode::SUCCESS
        }
        Command::Route { uid, product, conf } => {
            let config = match load(conf) {
                Ok(c) => c,
                Err(code) => return code,
            };
            route(&config, &uid, product.as_deref())
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

fn print_pools(config: &Config) {
    let listen: Vec<String> = config.listen.0.iter().map(ToString::to_string).collect();
    say!("configuration ok; listen {}", listen.join(", "));
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
    if let Some(program) = &config.hooks.program {
        for kind in crate::hooks::HookKind::ALL {
            if let Some(f) = program.file(kind) {
                println!("hook {}: {} (compiled)", kind.name(), f.name);
            }
        }
    }
}

fn route(config: &Config, uid: &str, product: Option<&str>) -> ExitCode {
    if let Err(crate::uid::UidError::Invalid(why)) = crate::uid::validate(uid, config.uid.max_len) {
        eprintln!("gopush: invalid uid: {why}");
        return ExitCode::FAILURE;
    }
    let router = match Router::offline(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gopush: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.pools.values().any(|p| p.is_dynamic()) {
        // DNS / file pools: discover them once (the only I/O `route` does).
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(router.refresh()),
            Err(e) => {
                eprintln!("gopush: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Ok(pool) = router.pool(product) else {
        eprintln!("gopush: unknown product `{}`", product.unwrap_or_default());
        return ExitCode::FAILURE;
    };
    let Some(primary) = pool.select_ignoring_health(uid.as_bytes()) else {
        eprintln!("gopush: pool `{}` has no backends", pool.name());
        return ExitCode::FAILURE;
    };
    let fmt = |b: &pingora::lb::Backend| backend_addr(b).map_or("-".to_string(), |a| a.to_string());
    let failover = pool
        .failover(uid.as_bytes(), &primary)
        .map_or_else(|| "none".to_string(), |b| fmt(&b));
    say!("{}", fmt(&primary));
    say!("pool: {}", pool.name());
    say!("if it is down: {failover}");
    ExitCode::SUCCESS
}

fn init(dir: &Path) -> anyhow::Result<()> {
    for (rel, _) in INIT_FILES {
        let path = dir.join(rel);
        if path.exists() {
            anyhow::bail!("{} exists; refusing to overwrite anything", path.display());
        }
    }
    for (rel, text) in INIT_FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
        say!("wrote {}", path.display());
    }
    say!(
        "next: edit conf/local.yaml, then `gopush run` (GOPUSH_ENV picks local/develop/production)"
    );
    Ok(())
}

fn demo() -> ExitCode {
    crate::logging::init(false, crate::config::LogFormat::Text);
    let config = match Config::from_str_named(DEMO_CONFIG, Path::new("<embedded demo config>")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gopush: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        assert!(config.hooks.program.is_some());
        // init never overwrites.
        assert!(init(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
