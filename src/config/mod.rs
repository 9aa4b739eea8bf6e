//! The configuration file: YAML in, a validated [`Config`] out.
//!
//! This is the only module that parses YAML. Everything the request path needs is checked here,
//! once, at start (and on reload), so the proxy phases never see a malformed value: addresses are
//! literal socket addresses, header names are valid, every pool has at least one backend.
//!
//! Errors name the file, the line and column where the parser knows them, the key path
//! (`pools.default.backends[1]`) and what is wrong; see [`ConfigError`].

mod env;
mod startup;
mod types;

pub use startup::Startup;
pub use types::*;

use std::path::{Path, PathBuf};

/// Upper bound of `server.read_buffer_bytes`: Pingora's own default is 64 KiB, and a bigger
/// buffer per connection is almost certainly a typo (it is held by every open connection).
pub const MAX_READ_BUFFER_BYTES: usize = 1 << 20;

/// Upper bound of `hooks.timeout`. A hook runs on the worker thread that serves the request, and
/// nothing else runs on that thread meanwhile: a hook that is slow on attacker-chosen input (a
/// catastrophic regular expression) holds the thread for its whole budget. The default (50 ms)
/// is far below; 1 s still lets a legitimate slow hook finish while bounding how long a handful
/// of hostile requests can stall everything else on the agent.
pub const MAX_HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the configuration came from and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML syntax, an unknown key, a wrong type, a value that failed its own check, or a
    /// `${VAR}` reference that could not be substituted.
    #[error("{file}:{location}{key}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// `line:column: ` when the parser knows it, else empty.
        location: String,
        /// The key path, e.g. `pools.default.backends[1]`, or empty.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The document parsed, but its parts do not fit together.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Does anything authenticate the admin API: a token (`admin.token`) or the `admin(req)`
    /// hook (`hooks.admin`)?
    pub fn admin_authenticated(&self) -> bool {
        self.admin.has_authentication() || self.hooks.admin.is_some()
    }

    /// Reads, parses (substituting `${VAR}` references in values) and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::from_str_named(&text, path)
    }

    /// Parses a configuration held in memory; `name` is used in error messages. `${VAR}` is
    /// looked up in the process environment.
    pub fn from_str_named(text: &str, name: &Path) -> Result<Config, ConfigError> {
        Self::from_str_with_env(text, name, &|var| std::env::var(var).ok())
    }

    /// [`Config::from_str_named`] with `${VAR}` looked up by `lookup`. Substitution happens in
    /// the parsed scalars, never in the text (see the `env` module): a variable cannot add YAML.
    fn from_str_with_env(
        text: &str,
        name: &Path,
        lookup: &env::Lookup,
    ) -> Result<Config, ConfigError> {
        // Syntax first, on its own: the typed pass below reads the document lazily and could
        // stop at a confusing value (`$` of an unquoted `${VAR}` in a flow collection) before
        // the parser reports the error that explains it.
        serde_yaml::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| parse_error(name, text, String::new(), e))?;
        let de = env::Expand::new(serde_yaml::Deserializer::from_str(text), lookup);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            parse_error(name, text, key, e.into_inner())
        })?;
        let mut config = config;
        config.origin = name.to_path_buf();
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                file: name.to_path_buf(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// The directory relative paths in this configuration (hook files, key files) start from.
    pub fn dir(&self) -> &Path {
        self.origin.parent().unwrap_or(Path::new(""))
    }

    /// An error about `key` of this configuration (its file named).
    pub fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.origin.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Cross-field checks that a single value's deserializer cannot make.
    fn validate(&self) -> Result<(), (String, String)> {
        if !self.pools.contains_key(DEFAULT_POOL) {
            return Err((
                "pools".into(),
                format!(
                    "a pool named `{DEFAULT_POOL}` is required (requests without a product use it)"
                ),
            ));
        }
        for (name, pool) in &self.pools {
            if pool.backends.is_empty() && !pool.is_dynamic() {
                return Err((
                    format!("pools.{name}.backends"),
                    "needs at least one backend (or `dns` / `file` discovery)".into(),
                ));
            }
            for (i, b) in pool.backends.iter().enumerate() {
                if pool.backends[..i].iter().any(|o| o.addr == b.addr) {
                    return Err((
                        format!("pools.{name}.backends[{i}]"),
                        format!("backend {} is listed twice", b.addr),
                    ));
                }
            }
        }
        for (i, entry) in self.listen.0.iter().enumerate() {
            if entry
                .tls
                .as_ref()
                .is_some_and(|t| t.certificates.is_empty())
                && self.acme.is_none()
            {
                return Err((
                    format!("listen[{i}].tls.certificates"),
                    "needs at least one certificate (or an `acme` section to obtain one)".into(),
                ));
            }
        }
        if let Some(acme) = &self.acme {
            let tls = self.listen.0.iter().any(|e| e.tls.is_some());
            let plain = self.listen.0.iter().any(|e| e.tls.is_none());
            match acme.challenge {
                crate::acme::ChallengeKind::TlsAlpn01 if !tls => return Err((
                    "acme.challenge".into(),
                    "tls-alpn-01 is answered on a TLS listener (port 443), and `listen` has none"
                        .into(),
                )),
                crate::acme::ChallengeKind::Http01 if !plain => return Err((
                    "acme.challenge".into(),
                    "http-01 is answered on a plain listener (port 80), and `listen` has none: \
                         add one or use `challenge: tls-alpn-01`"
                        .into(),
                )),
                _ => {}
            }
        }
        if self.uid.sources.is_empty() {
            return Err(("uid.sources".into(), "needs at least one source".into()));
        }
        if self.uid.forward.header.is_none() && self.uid.forward.query.is_none() {
            return Err((
                "uid.forward".into(),
                "set `header`, `query` or both: the backend must receive the uid".into(),
            ));
        }
        if !self.affinity.path.starts_with('/') {
            return Err((
                "affinity.path".into(),
                "must start with `/` (the Socket.IO path, `/socket.io/` by default)".into(),
            ));
        }
        if self.health_check.kind == HealthCheckKind::Http
            && !self.health_check.path.starts_with('/')
        {
            return Err(("health_check.path".into(), "must start with `/`".into()));
        }
        if self.admin.enabled
            && !self.admin.listen.ip().is_loopback()
            && !self.admin_authenticated()
        {
            return Err((
                "admin.token".into(),
                format!(
                    "the admin listener {} is not a loopback address: set a token (e.g. `token: ${{GOPUSH_ADMIN_TOKEN}}`), an admin hook (`hooks.admin`), or listen on 127.0.0.1",
                    self.admin.listen
                ),
            ));
        }
        if !self.push.uid_room.contains("{uid}") {
            return Err((
                "push.uid_room".into(),
                "must contain `{uid}` (e.g. `uid:{uid}`)".into(),
            ));
        }
        if let Err(e) = redis::Client::open(self.push.redis_url()) {
            return Err((
                "push.redis".into(),
                format!("not a Redis URL (redis://HOST:PORT/DB): {e}"),
            ));
        }
        self.push.check_cluster()?;
        if let Some(c) = &self.cluster {
            c.check()?;
            // The directory's scripts need one primary; its default, `push.redis`, is not the
            // Redis Cluster push publishes to, so make the operator name it.
            if c.enabled && c.redis.is_none() && !self.push.redis_cluster.is_empty() {
                return Err((
                    "cluster.redis".into(),
                    "required with push.redis_cluster: the connection directory needs a single Redis / Valkey primary (not a Redis Cluster), so name it here".into(),
                ));
            }
        }
        if self.limits.per_uid.max_connections > 0
            && !self.cluster.as_ref().is_some_and(|c| c.enabled)
        {
            return Err((
                "limits.per_uid.max_connections".into(),
                "needs the `cluster` section (connections are counted in its directory)".into(),
            ));
        }
        if self.push.max_payload == 0 {
            return Err(("push.max_payload".into(), "must be at least 1".into()));
        }
        if self.server.threads == 0 {
            return Err(("server.threads".into(), "must be at least 1".into()));
        }
        if self.server.read_buffer_bytes > MAX_READ_BUFFER_BYTES {
            return Err((
                "server.read_buffer_bytes".into(),
                format!(
                    "at most {MAX_READ_BUFFER_BYTES} (1 MiB); 0 reads straight from the socket"
                ),
            ));
        }
        if self.hooks.uid.is_some() && self.uid.sources != UidConfig::default().sources {
            return Err((
                "uid.sources".into(),
                "not used when `hooks.uid` is set (the hook decides the uid): remove one of them"
                    .into(),
            ));
        }
        for (key, status) in [
            ("hooks.on_throw.uid", self.hooks.on_throw.uid),
            ("hooks.on_throw.route", self.hooks.on_throw.route),
        ] {
            if !(400..=599).contains(&status) {
                return Err((
                    key.into(),
                    format!("{status} is not an error status (400..=599)"),
                ));
            }
        }
        if self.hooks.timeout.is_zero() || self.hooks.timeout > MAX_HOOK_TIMEOUT {
            return Err((
                "hooks.timeout".into(),
                format!(
                    "{} is not allowed: must be more than 0 and at most {} (a hook holds its worker thread for up to this long, so a hook that is slow on a client's input lets a few such requests stall every other request on that thread)",
                    humantime::format_duration(self.hooks.timeout),
                    humantime::format_duration(MAX_HOOK_TIMEOUT),
                ),
            ));
        }
        if self.hooks.memory_limit < (1 << 20) {
            return Err(("hooks.memory_limit".into(), "must be at least 1MiB".into()));
        }
        Ok(())
    }
}

/// `conf/../hooks/uid.js` → `hooks/uid.js`, without touching the filesystem (the names appear in
/// logs, JS stack traces and certificate reports, where the short form reads better).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let last = out.components().next_back();
                if matches!(last, Some(Component::Normal(_))) {
                    out.pop();
                } else if !matches!(last, Some(Component::RootDir | Component::Prefix(_))) {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A [`ConfigError::Parse`] from a serde_yaml error at `key` (may be empty).
fn parse_error(name: &Path, text: &str, key: String, e: serde_yaml::Error) -> ConfigError {
    let mut message = strip_serde_yaml_decorations(&e.to_string());
    let location = match e.location() {
        Some(l) => {
            let line = text.lines().nth(l.line().saturating_sub(1)).unwrap_or("");
            if key.is_empty() && line.contains("${") {
                message
                    .push_str(" (a `${VAR}` inside `[...]` or `{...}` must be quoted: \"${VAR}\")");
            }
            format!("{}:{}: ", l.line(), l.column())
        }
        None => String::new(),
    };
    ConfigError::Parse {
        file: name.to_path_buf(),
        location,
        key,
        message,
    }
}

/// serde_yaml repeats the path and location we already print; keep only the message.
fn strip_serde_yaml_decorations(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    // "key.path: message" → "message" (the key is printed separately).
    match msg.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.to_string(),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests;

impl PushConfig {
    /// `push.redis_cluster`: every seed a Redis URL without a database (a cluster has only
    /// database 0), the seeds agreeing on credentials (the client's own check), and not
    /// together with `push.redis`.
    fn check_cluster(&self) -> Result<(), (String, String)> {
        if self.redis_cluster.is_empty() {
            return Ok(());
        }
        if self.redis.is_some() {
            return Err((
                "push.redis_cluster".into(),
                "set either push.redis (one Redis) or push.redis_cluster (the seed nodes of a Redis Cluster), not both".into(),
            ));
        }
        for (i, url) in self.redis_cluster.iter().enumerate() {
            let key = format!("push.redis_cluster[{i}]");
            let info =
                redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(|e| {
                    (
                        key.clone(),
                        format!("not a Redis URL (redis://HOST:PORT): {e}"),
                    )
                })?;
            if info.redis.db != 0 {
                return Err((
                    key,
                    format!("a Redis Cluster has only database 0, not {}", info.redis.db),
                ));
            }
        }
        redis::cluster::ClusterClient::new(self.redis_cluster.iter().map(String::as_str))
            .map(drop)
            .map_err(|e| ("push.redis_cluster".into(), e.to_string()))
    }
}

impl ClusterConfig {
    /// The Redis URL the directory uses.
    pub fn redis_url<'a>(&'a self, push: &'a PushConfig) -> &'a str {
        self.redis.as_deref().unwrap_or(push.redis_url())
    }

    fn check(&self) -> Result<(), (String, String)> {
        if let Some(url) = &self.redis {
            if let Err(e) = redis::Client::open(url.as_str()) {
                return Err((
                    "cluster.redis".into(),
                    format!("not a Redis URL (redis://HOST:PORT/DB): {e}"),
                ));
            }
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        };
        if let Some(id) = &self.agent_id {
            if !name_ok(id) {
                return Err((
                    "cluster.agent_id".into(),
                    "1 to 64 characters of A-Z a-z 0-9 - _ . :".into(),
                ));
            }
        }
        if !name_ok(&self.key) {
            return Err((
                "cluster.key".into(),
                "1 to 64 characters of A-Z a-z 0-9 - _ . :".into(),
            ));
        }
        if self.heartbeat < std::time::Duration::from_millis(100) {
            return Err(("cluster.heartbeat".into(), "must be at least 100ms".into()));
        }
        if self.ttl < self.heartbeat * 2 {
            return Err((
                "cluster.ttl".into(),
                "must be at least twice cluster.heartbeat (one lost heartbeat must not kill an agent)"
                    .into(),
            ));
        }
        if self.timeout.is_zero() || self.timeout >= self.heartbeat {
            return Err((
                "cluster.timeout".into(),
                "must be more than 0 and less than cluster.heartbeat".into(),
            ));
        }
        if self.sid_lookup_timeout > std::time::Duration::from_secs(1) {
            return Err((
                "cluster.sid_lookup_timeout".into(),
                "at most 1s (it is waited for on the request path)".into(),
            ));
        }
        if self.queue == 0 {
            return Err(("cluster.queue".into(), "must be at least 1".into()));
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if w.secret.is_empty() {
                return Err((
                    format!("cluster.webhooks[{i}].secret"),
                    "must not be empty (every delivery is signed)".into(),
                ));
            }
            if w.queue == 0 {
                return Err((
                    format!("cluster.webhooks[{i}].queue"),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}
