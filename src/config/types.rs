//! The configuration's shape. Each value checks itself while it is deserialized, so that a wrong
//! value is reported with its line and key path.

use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::callback::CallbackSource;
pub use crate::client_ip::TrustedProxies;
pub use crate::jwt::JwtSource;

/// The pool used when a request names no product.
pub const DEFAULT_POOL: &str = "default";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Addresses the agent listens on.
    #[serde(default)]
    pub listen: Listen,
    /// Where the uid comes from and how it is handed to the backend.
    #[serde(default)]
    pub uid: UidConfig,
    /// Query parameter that selects a pool (the original gopush's `product`).
    #[serde(default = "default_product_param")]
    pub product_param: String,
    /// Named backend pools; `default` is required.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Active health checks of every backend.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Connections to backends.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Engine.IO session → backend memory.
    #[serde(default)]
    pub affinity: AffinityConfig,
    /// The per-request access log.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// Limits on request size, rates and concurrency.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Pingora's server settings.
    #[serde(default)]
    pub server: ServerSection,
    /// JavaScript hooks.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// Proxies whose `X-Forwarded-For` is believed when working out the client address
    /// (CIDR blocks or addresses; empty: the TCP peer is the client).
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// The admin listener: JSON API, Prometheus metrics and the admin page.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Pushing events into the Socket.IO cluster through its Redis adapter.
    #[serde(default)]
    pub push: PushConfig,
    /// ACME certificates (HTTP-01, answered on the plain listeners).
    #[serde(default)]
    pub acme: Option<crate::acme::AcmeConfig>,
    /// The file this configuration was read from (or the name it was given): errors name it,
    /// and relative paths in it (hook files, key files) are read from its directory.
    #[serde(skip)]
    pub origin: PathBuf,
    /// One view of the cluster through Redis: connection directory, presence, shared sid memory
    /// (absent: each agent knows only itself, and the request path does nothing extra).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

// `Config` has a required key (`pools`), so its other keys default one by one.
fn default_product_param() -> String {
    "product".into()
}

/// One address or a list of listen entries (see [`ListenEntry`]).
#[derive(Debug, Clone)]
pub struct Listen(pub Vec<ListenEntry>);

impl Listen {
    /// The socket addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|e| e.addr).collect()
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen(vec![ListenEntry::plain(SocketAddr::from((
            [0, 0, 0, 0],
            6003,
        )))])
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = Vec<ListenEntry>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address \"IP:port\" or a list of listen entries")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(vec![ListenEntry::plain(
                    parse_socket_addr(s).map_err(E::custom)?,
                )])
            }
            fn visit_seq<S: de::SeqAccess<'de>>(self, seq: S) -> Result<Self::Value, S::Error> {
                // In place, not through an untagged enum: errors inside keep their key path.
                Vec::<ListenEntry>::deserialize(de::value::SeqAccessDeserializer::new(seq))
            }
        }
        let list = d.deserialize_any(Visit)?;
        if list.is_empty() {
            return Err(de::Error::custom("needs at least one address"));
        }
        for (i, e) in list.iter().enumerate() {
            if list[..i].iter().any(|o| o.addr == e.addr) {
                return Err(de::Error::custom(format!(
                    "listen[{i}]: {} is listed twice",
                    e.addr
                )));
            }
            if e.tls.is_some() && e.redirect_https {
                return Err(de::Error::custom(format!(
                    "listen[{i}]: `redirect_https` is for a plain listener; {} is TLS",
                    e.addr
                )));
            }
        }
        Ok(Listen(list))
    }
}

/// One listening socket: plain HTTP (a string `"IP:port"`, or a map without `tls`), or TLS.
#[derive(Debug, Clone)]
pub struct ListenEntry {
    /// The socket address.
    pub addr: SocketAddr,
    /// TLS on this socket (`None`: plain HTTP).
    pub tls: Option<TlsListen>,
    /// A plain listener answers every request (but ACME HTTP-01 challenges) with a 308 to https.
    pub redirect_https: bool,
    /// The port put in the redirect's `Location` (`None`: no port, i.e. 443).
    pub https_port: Option<u16>,
}

impl ListenEntry {
    /// A plain HTTP listener.
    pub fn plain(addr: SocketAddr) -> Self {
        ListenEntry {
            addr,
            tls: None,
            redirect_https: false,
            https_port: None,
        }
    }
}

impl<'de> Deserialize<'de> for ListenEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            addr: String,
            #[serde(default)]
            tls: Option<TlsListen>,
            #[serde(default)]
            redirect_https: bool,
            #[serde(default)]
            https_port: Option<u16>,
        }
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = Full;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"IP:port\" or {addr: \"IP:port\", tls: {...}, redirect_https: ...}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Full, E> {
                Ok(Full {
                    addr: s.to_string(),
                    tls: None,
                    redirect_https: false,
                    https_port: None,
                })
            }
            fn visit_map<M: de::MapAccess<'de>>(self, map: M) -> Result<Full, M::Error> {
                // Deserialized in place (not through an untagged enum), so an error inside
                // keeps its key path.
                Full::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        let full = d.deserialize_any(Visit)?;
        Ok(ListenEntry {
            addr: parse_socket_addr(&full.addr).map_err(de::Error::custom)?,
            tls: full.tls,
            redirect_https: full.redirect_https,
            https_port: full.https_port,
        })
    }
}

/// `listen[].tls`: certificates picked by SNI, HTTP/2 by ALPN, the handshake's time bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListen {
    /// PEM certificate chains (leaf first) with their keys; the names each one serves are read
    /// from the leaf's subjectAltName.
    pub certificates: Vec<CertificateFiles>,
    /// A name (as a certificate covers it) whose certificate answers clients without SNI and
    /// clients asking for a name no certificate has. Unset: no SNI gets the first certificate,
    /// an unknown name fails the handshake.
    #[serde(default)]
    pub default: Option<String>,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`).
    #[serde(default = "yes")]
    pub h2: bool,
    /// A TLS handshake not complete within this is dropped.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the certificate files are checked for changes (a renewal written over them);
    /// changed files are loaded as a reload would. `0s`: only reloads read them.
    #[serde(default = "default_cert_watch", with = "humantime_serde")]
    pub watch: Duration,
}

fn yes() -> bool {
    true
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_cert_watch() -> Duration {
    Duration::from_secs(60)
}

/// One certificate: its PEM chain and its PEM private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// The chain, leaf first (relative paths are from the configuration file's directory).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("`{s}` is not a literal IP:port (host names are not resolved here: nginx-compatible hashing needs the exact address)")
    })
}

/// Where the uid is read from, and how it is forwarded.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UidConfig {
    /// Sources tried in order; the first that yields a non-empty value wins.
    pub sources: Vec<UidSource>,
    /// How the backend receives the resolved uid.
    pub forward: ForwardConfig,
    /// Longest accepted uid in bytes.
    pub max_len: usize,
}

impl Default for UidConfig {
    fn default() -> Self {
        UidConfig {
            sources: vec![
                UidSource::Cookie("uid".into()),
                UidSource::Query("uid".into()),
            ],
            forward: ForwardConfig::default(),
            max_len: 256,
        }
    }
}

/// One place a uid can come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSource")]
pub enum UidSource {
    /// A cookie of this name.
    Cookie(String),
    /// A query parameter of this name.
    Query(String),
    /// A request header (lower-case name).
    Header(http::HeaderName),
    /// A signed token (JWT); the uid is one of its claims.
    Jwt(Box<JwtSource>),
    /// The user's own app is asked (like nginx `auth_request`).
    Callback(Box<CallbackSource>),
}

impl fmt::Display for UidSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UidSource::Cookie(n) => write!(f, "cookie `{n}`"),
            UidSource::Query(n) => write!(f, "query `{n}`"),
            UidSource::Header(n) => write!(f, "header `{n}`"),
            UidSource::Jwt(j) => j.fmt(f),
            UidSource::Callback(c) => c.fmt(f),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    cookie: Option<String>,
    query: Option<String>,
    header: Option<String>,
    jwt: Option<Box<JwtSource>>,
    callback: Option<Box<CallbackSource>>,
}

impl TryFrom<RawSource> for UidSource {
    type Error = String;
    fn try_from(raw: RawSource) -> Result<Self, String> {
        let source = match (raw.cookie, raw.query, raw.header, raw.jwt, raw.callback) {
            (Some(c), None, None, None, None) => UidSource::Cookie(c),
            (None, Some(q), None, None, None) => UidSource::Query(q),
            (None, None, Some(h), None, None) => UidSource::Header(parse_header_name(&h)?),
            (None, None, None, Some(j), None) => UidSource::Jwt(j),
            (None, None, None, None, Some(c)) => UidSource::Callback(c),
            _ => {
                return Err(
                    "a source is exactly one of `cookie: NAME`, `query: NAME`, `header: NAME`, `jwt: {...}`, `callback: {...}`"
                        .into(),
                )
            }
        };
        match &source {
            UidSource::Cookie(n) | UidSource::Query(n) if n.is_empty() => {
                Err("the name must not be empty".into())
            }
            _ => Ok(source),
        }
    }
}

fn parse_header_name(s: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("`{s}` is not a valid header name"))
}

/// How the backend receives the resolved uid. Client-sent copies of both are removed first.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// Header carrying the uid (`null` to not send one).
    #[serde(deserialize_with = "opt_header_name")]
    pub header: Option<http::HeaderName>,
    /// Query parameter carrying the uid (`null` to not send one).
    pub query: Option<String>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            header: Some(http::HeaderName::from_static("x-gopush-uid")),
            query: Some("uid".into()),
        }
    }
}

fn opt_header_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<http::HeaderName>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_header_name(&s).map_err(de::Error::custom))
        .transpose()
}

/// One pool of interchangeable backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Backends as `"IP:port"` or `{addr: "IP:port", weight: N}`.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// More backends from DNS (re-resolved periodically).
    #[serde(default)]
    pub dns: Option<DnsDiscovery>,
    /// More backends from a watched file.
    #[serde(default)]
    pub file: Option<FileDiscovery>,
}

impl PoolConfig {
    /// Does membership change at run time (DNS or file)?
    pub fn is_dynamic(&self) -> bool {
        self.dns.is_some() || self.file.is_some()
    }
}

/// Backends from the A/AAAA records of a name (e.g. a Kubernetes headless service).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscovery {
    /// The name to resolve.
    pub name: String,
    /// The port every resolved address serves on.
    pub port: u16,
    /// Ketama weight of each resolved backend.
    #[serde(default = "one_u16")]
    pub weight: u16,
    /// How often the name is resolved again.
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// DNS server to ask (`IP:port`); default: the system's (/etc/resolv.conf).
    #[serde(default, deserialize_with = "opt_socket_addr")]
    pub resolver: Option<SocketAddr>,
}

/// Backends from a file: one `IP:port [weight]` per line, `#` comments; re-read periodically.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    /// The file.
    pub path: std::path::PathBuf,
    /// How often it is read again.
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub interval: Duration,
}

// Field-level defaults where a section has required keys (no `Default` for the whole of it).
fn one_u16() -> u16 {
    1
}
fn default_discovery_interval() -> Duration {
    Duration::from_secs(5)
}

fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_socket_addr(&s).map_err(de::Error::custom))
        .transpose()
}

/// Parses one line of a backends file: `IP:port [weight]`; `None` for blank and comment lines.
pub fn parse_backend_line(line: &str) -> Option<Result<BackendConfig, String>> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return None;
    }
    let mut parts = line.split_whitespace();
    let addr = parts.next()?;
    let weight = match parts.next().map(str::parse::<u16>) {
        None => Ok(1),
        Some(Ok(w)) if (1..=100).contains(&w) => Ok(w),
        Some(_) => Err(format!("`{line}`: the weight must be 1..=100")),
    };
    Some(weight.and_then(|weight| {
        let addr = parse_socket_addr(addr)?;
        Ok(BackendConfig { addr, weight })
    }))
}

/// One backend and its Ketama weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Literal socket address.
    pub addr: SocketAddr,
    /// Relative share of uids (1..=100); nginx's `weight=`.
    pub weight: u16,
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `#[serde(untagged)]`: untagged buffers the value, and errors
        // raised after buffering lose the item's own line in block lists.
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend: \"IP:port\" or {addr: \"IP:port\", weight: N}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendConfig, E> {
                backend_config(v, 1).map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BackendConfig, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Full {
                    addr: String,
                    #[serde(default = "one_u16")]
                    weight: u16,
                }
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                backend_config(&f.addr, f.weight).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(Visit)
    }
}

fn backend_config(addr: &str, weight: u16) -> Result<BackendConfig, String> {
    if !(1..=100).contains(&weight) {
        return Err(format!("weight {weight} of {addr} is out of range 1..=100"));
    }
    Ok(BackendConfig {
        addr: parse_socket_addr(addr)?,
        weight,
    })
}

/// How backends are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers 200.
    Http,
    /// No probing: every backend is always considered healthy.
    None,
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Probe kind.
    pub kind: HealthCheckKind,
    /// Time between probes of one backend.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Connect (and for HTTP, response) timeout of one probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed probes that make a healthy backend unhealthy (one slow accept under
    /// load must not move a backend's users).
    pub fall: usize,
    /// Consecutive good probes that make an unhealthy backend healthy again.
    pub rise: usize,
    /// Path for `kind: http`.
    pub path: String,
    /// Host header for `kind: http`.
    pub host: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            fall: 2,
            rise: 1,
            path: "/".into(),
            host: "localhost".into(),
        }
    }
}

/// Connections to backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP connect timeout; a backend that does not accept within it counts as failed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            // Above Linux's 1 s initial SYN retransmission: a backend whose accept queue
            // overflowed for a moment (a reconnect storm) still gets a second SYN before the
            // agent gives up.
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Engine.IO session → backend memory (session continuity).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    /// Remember sessions at all.
    pub enabled: bool,
    /// Upper bound of remembered sessions (least useful are evicted first).
    pub max_sessions: usize,
    /// How long a session is remembered after its handshake.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The Socket.IO (Engine.IO) path: only polling handshakes under it teach the memory.
    pub path: String,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            enabled: true,
            max_sessions: 100_000,
            ttl: Duration::from_secs(24 * 3600),
            path: "/socket.io/".into(),
        }
    }
}

/// The access log: one line per request and per closed tunnel, written off the request path.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write it at all.
    pub enabled: bool,
    /// `text` (key=value) or `json` (one JSON object per line). The whole log switches, since it
    /// is one stream; it is set at start (a reload keeps the running format).
    pub format: LogFormat,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z INFO gopush::access: method=GET status=200 ...`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","target":"gopush::access","method":"GET",...}`
    Json,
}

/// A secret from the configuration (usually `${ENV}`); never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparing it (in constant time) with what a client sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The admin listener (see README, "Operating gopush").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API at all.
    pub enabled: bool,
    /// Its own address, apart from the proxy's; loopback by default.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bearer token every API call must carry (`Authorization: Bearer TOKEN`). Empty means none,
    /// so that `${GOPUSH_ADMIN_TOKEN:-}` can leave it unset.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 6004)),
            token: None,
        }
    }
}

impl AdminConfig {
    /// The configured token, if it is set and not empty.
    pub fn token(&self) -> Option<&str> {
        self.token
            .as_ref()
            .map(Secret::expose)
            .filter(|t| !t.is_empty())
    }

    /// Does a token guard the admin API? (An `admin(req)` hook counts too; the configuration's
    /// validation checks both, since the hook lives in `hooks.admin`.)
    pub fn has_authentication(&self) -> bool {
        self.token().is_some()
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s).map_err(de::Error::custom)
}

/// Publishing into the Socket.IO cluster through Redis, in the Node `@socket.io/redis-adapter`
/// wire format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// The Redis the Node backends' adapter uses (one server: a primary, or Valkey); absent:
    /// [`DEFAULT_PUSH_REDIS`]. See [`PushConfig::redis_url`].
    pub redis: Option<String>,
    /// Seed nodes of a Redis Cluster the adapter uses instead (`redis://HOST:PORT` each); the
    /// client learns the rest of the cluster from them. Excludes `redis`.
    pub redis_cluster: Vec<String>,
    /// The room that addresses one user; `{uid}` is replaced by the uid. Backends join it with
    /// `socket.join("uid:" + uid)`.
    pub uid_room: String,
    /// Largest encoded event (event name plus data) in bytes.
    pub max_payload: usize,
    /// The adapter's channel prefix (its `key` option).
    pub key: String,
    /// Connect and publish timeout; past it the API answers 503.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Which Node adapter the backends use: `createAdapter` (classic pub/sub) or
    /// `createShardedAdapter` (Redis 7 sharded pub/sub).
    pub adapter: PushAdapter,
    /// The sharded adapter's `subscriptionMode` (decides which channel a one-room push takes).
    pub subscription_mode: SubscriptionMode,
}

/// `push.redis` when neither it nor `push.redis_cluster` is set.
pub const DEFAULT_PUSH_REDIS: &str = "redis://127.0.0.1:6379";

impl PushConfig {
    /// The single Redis of `push.redis` (or its default). With `push.redis_cluster` set, push
    /// does not use it; it is still what `cluster.redis` would default to, which is why the
    /// validation then asks for `cluster.redis`.
    pub fn redis_url(&self) -> &str {
        self.redis.as_deref().unwrap_or(DEFAULT_PUSH_REDIS)
    }
}

/// `push.adapter`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushAdapter {
    /// `@socket.io/redis-adapter`'s `createAdapter`: emitter format, `PUBLISH`.
    #[default]
    Classic,
    /// `createShardedAdapter`: cluster-adapter messages, `SPUBLISH`.
    Sharded,
}

/// `push.subscription_mode`, as the sharded adapter's option of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubscriptionMode {
    /// One channel per namespace.
    Static,
    /// Plus one channel per public room (the adapter's default).
    #[default]
    Dynamic,
    /// Plus one channel per room, private ones (socket ids) included.
    DynamicPrivate,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            redis: None,
            redis_cluster: Vec::new(),
            uid_room: "uid:{uid}".into(),
            max_payload: 65536,
            key: "socket.io".into(),
            timeout: Duration::from_secs(2),
            adapter: PushAdapter::default(),
            subscription_mode: SubscriptionMode::default(),
        }
    }
}

/// `cluster`: the connection directory and shared sid memory in Redis (see README, "Cluster
/// view"). Restart-only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Turns the section off without deleting it.
    pub enabled: bool,
    /// The Redis (a single primary, or Valkey); absent: `push.redis`. Never a Redis Cluster
    /// (the directory's scripts touch global keys): with `push.redis_cluster` it must be set.
    pub redis: Option<String>,
    /// This process's name in the directory; absent: host name, pid and start time, so a
    /// restarted agent never claims what an earlier process wrote.
    pub agent_id: Option<String>,
    /// Prefix of every key.
    pub key: String,
    /// How often the agent says it is alive (and reaps agents that stopped saying so).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// An agent silent for this long is dead: its connections leave the view.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Connect / command timeout of the background writer and the presence API.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait for the shared sid memory on the request path (only for a request with a sid
    /// the agent does not know); past it the ring decides.
    #[serde(with = "humantime_serde")]
    pub sid_lookup_timeout: Duration,
    /// Most directory writes queued while Redis is slow or down; past it the oldest are dropped
    /// (counted) and the agent re-publishes its whole state once Redis answers.
    pub queue: usize,
    /// Receivers of presence events (`user.online`, `user.offline`, `connection.open`,
    /// `connection.close`), signed with HMAC-SHA256.
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// `user.offline` waits this long after the uid's last connection closed, so that a quick
    /// reconnect or a hand-over does not flap.
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: true,
            redis: None,
            agent_id: None,
            key: "gopush".into(),
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
            timeout: Duration::from_secs(1),
            sid_lookup_timeout: Duration::from_millis(50),
            queue: 65_536,
            webhooks: Vec::new(),
            offline_after: Duration::from_secs(5),
        }
    }
}

/// Limits; excess requests are refused with 429 / 431 / 503 and the limit's name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request head (request line and headers) in bytes; Node rejects > 16 KiB anyway.
    pub max_header_bytes: usize,
    /// Most WebSocket tunnels open at once; upgrades past it get 503.
    pub max_tunnels: usize,
    /// Per client IP (the peer address of the connection).
    pub per_ip: RateLimit,
    /// Per uid.
    pub per_uid: UidLimit,
    /// Time a client has to deliver a complete request head, counted from the accept of its
    /// connection (or, on a kept-alive connection, from the first byte of the next request);
    /// past it the connection is closed (slowloris). `0s` turns it off, leaving only Pingora's
    /// per-read timeout (60 s, renewed by every byte).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 16 * 1024,
            max_tunnels: 100_000,
            per_ip: RateLimit::default(),
            per_uid: UidLimit::default(),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A request rate and a concurrency cap; 0 turns either off (the default: clients behind one NAT
/// share an IP, and one user may have many tabs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per second (a one-second window).
    pub requests_per_second: u32,
    /// Requests and tunnels open at once.
    pub max_concurrent: u32,
}

/// `limits.per_uid`: the rate and concurrency limits of [`RateLimit`], plus the number of
/// connections (WebSocket tunnels and polling sessions) a uid may hold across the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UidLimit {
    /// Requests per second (a one-second window).
    pub requests_per_second: u32,
    /// Requests and tunnels open at once (on this agent).
    pub max_concurrent: u32,
    /// Connections of one uid in the cluster directory (needs `cluster`; 0: no limit). A new
    /// polling handshake or WebSocket past it is refused with 429.
    pub max_connections: u32,
    /// What happens past `max_connections`: `reject` (the new connection is refused) or
    /// `close_oldest` (it is let through; the uid's oldest connections are closed).
    pub on_exceed: OnExceed,
}

impl UidLimit {
    /// The rate and concurrency part.
    pub fn rate(&self) -> RateLimit {
        RateLimit {
            requests_per_second: self.requests_per_second,
            max_concurrent: self.max_concurrent,
        }
    }
}

/// `limits.per_uid.on_exceed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// Refuse the new connection (429 naming the limit).
    #[default]
    Reject,
    /// Let the new connection through and close the uid's oldest ones, wherever they are
    /// (each by the agent that holds it; see [`crate::kick`]).
    CloseOldest,
}

/// JavaScript hooks: files, limits and what a failing hook answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// `uid(req)`; replaces `uid.sources` when set.
    pub uid: Option<PathBuf>,
    /// `route(req, uid)`.
    pub route: Option<PathBuf>,
    /// `admin(req)` (the admin console).
    pub admin: Option<PathBuf>,
    /// Time budget of one hook call; a hook running longer is interrupted (500).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Memory limit of the JS engine of one worker thread (`16MiB`, `512KiB`, bytes).
    #[serde(deserialize_with = "byte_size")]
    pub memory_limit: usize,
    /// Status answered when a hook throws or returns a wrong value.
    pub on_throw: OnThrow,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            uid: None,
            route: None,
            admin: None,
            timeout: Duration::from_millis(50),
            memory_limit: 16 << 20,
            on_throw: OnThrow::default(),
        }
    }
}

impl HooksConfig {
    /// The configured files by hook.
    pub fn files(&self) -> impl Iterator<Item = (crate::hooks::HookKind, &PathBuf)> {
        use crate::hooks::HookKind;
        [
            (HookKind::Uid, &self.uid),
            (HookKind::Route, &self.route),
            (HookKind::Admin, &self.admin),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.as_ref().map(|p| (k, p)))
    }
}

/// Statuses for hooks that throw. Breaking a limit (time, memory) is always 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnThrow {
    /// The uid hook threw: by default the request has no usable uid (430).
    pub uid: u16,
    /// The route hook threw.
    pub route: u16,
}

impl Default for OnThrow {
    fn default() -> Self {
        OnThrow {
            uid: 430,
            route: 500,
        }
    }
}

/// `16MiB`, `512KiB`, `1GiB`, `4MB` or a number of bytes.
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Bytes(n) => return usize::try_from(n).map_err(de::Error::custom),
        Raw::Text(t) => t,
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(de::Error::custom(format!(
                "`{text}` is not a size (e.g. 16MiB, 512KiB)"
            )))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_bytes))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| de::Error::custom(format!("`{text}` is not a size (e.g. 16MiB, 512KiB)")))
}

/// Pingora's own server settings (see Pingora's `ServerConf`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Let idle worker threads take tasks from busy ones. Off by default: each connection then
    /// lives on one thread with that thread's own event loop, and a relayed WebSocket message
    /// wakes no other thread (benches/FINDINGS.md: fewer context switches, more messages per CPU
    /// second).
    pub work_stealing: bool,
    /// Run in the background (`-d` also sets it).
    pub daemon: bool,
    /// PID file (daemon mode).
    pub pid_file: String,
    /// Unix socket over which listening sockets are handed to a new binary (`-u`).
    pub upgrade_sock: String,
    /// Error log file (daemon mode); stderr otherwise.
    pub error_log: Option<String>,
    /// Drop privileges to this user (daemon mode).
    pub user: Option<String>,
    /// Drop privileges to this group (daemon mode).
    pub group: Option<String>,
    /// After a graceful stop/upgrade signal, how long existing connections may finish.
    pub grace_period_seconds: u64,
    /// After the grace period, how long services get to shut down.
    pub graceful_shutdown_timeout_seconds: u64,
    /// Idle upstream connections kept for reuse.
    pub upstream_keepalive_pool_size: usize,
    /// In daemon mode, the parent exits only once the services are ready.
    pub daemon_wait_for_ready: bool,
    /// While handing over or stopping, close open WebSocket tunnels one by one over the first
    /// half of the grace period (see `crate::handover`) rather than all at its end.
    pub spread_tunnel_closes: bool,
    /// Bytes of user-space read buffer in front of each client connection (Pingora's L4 read
    /// buffer). 0 reads straight from the socket: on a plaintext listener the buffer only adds a
    /// copy, and it is held for the life of every connection, WebSocket tunnels included.
    pub read_buffer_bytes: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            work_stealing: false,
            daemon: false,
            pid_file: "/tmp/gopush.pid".into(),
            upgrade_sock: "/tmp/gopush_upgrade.sock".into(),
            error_log: None,
            user: None,
            group: None,
            // Long enough for a held long-poll (pingInterval 25 s) to complete on the old
            // process.
            grace_period_seconds: 30,
            graceful_shutdown_timeout_seconds: 5,
            upstream_keepalive_pool_size: 128,
            daemon_wait_for_ready: true,
            spread_tunnel_closes: true,
            read_buffer_bytes: 0,
        }
    }
}

impl ServerSection {
    /// Several threads, each with its own runtime and I/O driver (no work stealing): then a
    /// socket belongs to one thread's driver, and gopush keeps each connection's events on the
    /// thread that serves it (`crate::local_tcp`).
    pub fn drivers_per_thread(&self) -> bool {
        !self.work_stealing && self.threads > 1
    }

    /// The window over which tunnels are closed during a hand-over: the first half of the grace
    /// period (the second half leaves each tunnel time to meet its next Engine.IO ping), or zero
    /// when spreading is off.
    pub fn tunnel_close_spread(&self) -> std::time::Duration {
        if self.spread_tunnel_closes {
            std::time::Duration::from_millis(self.grace_period_seconds.saturating_mul(500))
        } else {
            std::time::Duration::ZERO
        }
    }

    /// Pingora's `ServerConf` with these settings applied over its defaults.
    pub fn to_pingora(&self) -> pingora::server::configuration::ServerConf {
        let mut conf = pingora::server::configuration::ServerConf {
            threads: self.threads,
            work_stealing: self.work_stealing,
            daemon: self.daemon,
            pid_file: self.pid_file.clone(),
            upgrade_sock: self.upgrade_sock.clone(),
            error_log: self.error_log.clone(),
            user: self.user.clone(),
            group: self.group.clone(),
            grace_period_seconds: Some(self.grace_period_seconds),
            graceful_shutdown_timeout_seconds: Some(self.graceful_shutdown_timeout_seconds),
            upstream_keepalive_pool_size: self.upstream_keepalive_pool_size,
            daemon_wait_for_ready: self.daemon_wait_for_ready,
            ..Default::default()
        };
        conf.version = 1;
        conf
    }
}
