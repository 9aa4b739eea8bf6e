//! ACME certificates (RFC 8555) with the HTTP-01 or TLS-ALPN-01 (RFC 8737) challenge, through the
//! `instant-acme` client.
//!
//! ```text
//! AcmeService (a Pingora background service, never on the request path)
//!   start:  a stored, valid certificate is published at once
//!   loop:   due (missing, not covering `domains`, or expiring within `renew_before`)?
//!             → flock `<storage>/<name>.lock` (other agents sharing `storage` wait here)
//!             → re-read the store: another agent may have just issued → use that, no order
//!             → order: each authorization's HTTP-01 key authorization goes into [`challenges`],
//!               which the proxy answers at `/.well-known/acme-challenge/{token}`
//!             → store key + chain (write to a temporary file, rename) → publish
//!           failure: logged with the ACME problem, counted, retried with backoff
//! ```
//!
//! Published certificates go to whoever [`AcmeService::new`] was given (the TLS certificate
//! table), swapped in without a restart.

use crate::metrics::counters;
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::sign::CertifiedKey;
use serde::{de, Deserialize, Deserializer, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where HTTP-01 challenges are answered.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// First wait after a failure (shorter if `check_interval` is).
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// How long one order may take from `new_order` to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an agent waiting for another one's storage lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// `acme`: obtain and renew a certificate for `domains`. Each field checks itself, so a bad
/// value is reported with its key (`acme.domains`) and line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL (https).
    #[serde(deserialize_with = "https_url")]
    pub directory: String,
    /// Contact address for the account (`mailto:` is added).
    #[serde(default, deserialize_with = "opt_email")]
    pub email: Option<String>,
    /// DNS names of the certificate (the first names its files).
    #[serde(deserialize_with = "dns_names")]
    pub domains: Vec<String>,
    /// Directory for the account, keys, certificates and the lock; may be shared by agents.
    #[serde(deserialize_with = "dir_path")]
    pub storage: PathBuf,
    /// Renew when the certificate expires within this.
    #[serde(default = "default_renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often the certificate's expiry is checked.
    #[serde(
        default = "default_check_interval",
        deserialize_with = "positive_duration"
    )]
    pub check_interval: Duration,
    /// PEM CA certificate trusted for the directory's HTTPS instead of the system roots (a test
    /// CA such as pebble's).
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// How the CA checks that the agent serves the domains.
    #[serde(default)]
    pub challenge: ChallengeKind,
}

/// `acme.challenge`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ChallengeKind {
    /// An HTTP request to port 80 (a plain listener) for `/.well-known/acme-challenge/{token}`.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A TLS handshake on port 443 (a TLS listener) offering ALPN `acme-tls/1` (RFC 8737): for
    /// agents that expose no plain port.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

fn default_renew_before() -> Duration {
    Duration::from_secs(30 * 86400)
}

fn default_check_interval() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn https_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    let url = url.trim();
    if !url.starts_with("https://") || url.len() == "https://".len() {
        return Err(de::Error::custom(format!(
            "`{url}` is not an https:// URL (ACME directories are served over HTTPS)"
        )));
    }
    Ok(url.to_string())
}

fn opt_email<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let email = String::deserialize(d)?;
    if !email.contains('@') || email.contains(char::is_whitespace) {
        return Err(de::Error::custom(format!(
            "`{email}` is not an e-mail address"
        )));
    }
    Ok(Some(email))
}

fn dns_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    if raw.is_empty() {
        return Err(de::Error::custom("needs at least one DNS name"));
    }
    let mut domains: Vec<String> = Vec::with_capacity(raw.len());
    for d in &raw {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        if let Err(why) = check_dns_name(&d) {
            return Err(de::Error::custom(format!("`{d}` {why}")));
        }
        if domains.contains(&d) {
            return Err(de::Error::custom(format!("`{d}` is listed twice")));
        }
        domains.push(d);
    }
    Ok(domains)
}

fn dir_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let p = PathBuf::deserialize(d)?;
    if p.as_os_str().is_empty() {
        return Err(de::Error::custom("must name a directory"));
    }
    Ok(p)
}

fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = humantime_serde::deserialize(d)?;
    if Duration::is_zero(&v) {
        return Err(de::Error::custom("must be more than 0"));
    }
    Ok(v)
}

/// HTTP-01 proves control of one name at a time: wildcards, IP addresses and odd characters are
/// refused here rather than by the CA after an order.
fn check_dns_name(d: &str) -> Result<(), &'static str> {
    if d.starts_with("*.") {
        return Err("is a wildcard: HTTP-01 cannot validate wildcards");
    }
    if d.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address: only DNS names are ordered");
    }
    if d.is_empty() || d.len() > 253 {
        return Err("is not a DNS name");
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err("is not a DNS name (letters, digits, `-` and `.` only)");
        }
    }
    Ok(())
}

impl AcmeConfig {
    /// This section with `storage` and `directory_ca` relative to `dir` (the configuration
    /// file's directory); checks that the CA file is a PEM certificate (`gopush check` reports
    /// it as `(key, problem)`).
    pub fn resolved(&self, dir: &Path) -> Result<AcmeConfig, (String, String)> {
        let mut c = self.clone();
        c.storage = dir.join(&self.storage);
        if let Some(ca) = &self.directory_ca {
            let ca = dir.join(ca);
            read_ca(&ca).map_err(|e| ("directory_ca".to_string(), e))?;
            c.directory_ca = Some(ca);
        }
        Ok(c)
    }

    /// The name of the certificate's files: the first domain.
    fn name(&self) -> &str {
        self.domains.first().map(String::as_str).unwrap_or("acme")
    }

    /// The stored chain (leaf first).
    pub fn cert_path(&self) -> PathBuf {
        self.storage.join(self.name()).join("cert.pem")
    }

    /// The stored private key.
    pub fn key_path(&self) -> PathBuf {
        self.storage.join(self.name()).join("key.pem")
    }

    fn lock_path(&self) -> PathBuf {
        self.storage.join(format!("{}.lock", self.name()))
    }

    fn account_path(&self) -> PathBuf {
        self.storage.join("account.json")
    }
}

fn read_ca(path: &Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .map(|_| ())
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))
}

/// The HTTP-01 key authorizations of the orders in progress, by token. Process-wide: the ACME
/// services fill it, the proxy (every listener) answers from it. Each is also written to
/// `<storage>/challenges/<token>`: behind a load balancer the CA's request may reach another agent
/// sharing the storage than the one that ordered, and that agent answers from the file.
#[derive(Default)]
pub struct Challenges {
    pending: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01 certificates of the orders in progress, by domain.
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// The storage directories of this process's ACME services.
    storages: RwLock<Vec<PathBuf>>,
}

static CHALLENGES: LazyLock<Challenges> = LazyLock::new(Challenges::default);

/// The process's challenge table.
pub fn challenges() -> &'static Challenges {
    &CHALLENGES
}

/// Tokens are base64url (RFC 8555 8.1); anything else is no token of ours and never a path.
fn is_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn challenge_file(storage: &Path, token: &str) -> PathBuf {
    storage.join("challenges").join(token)
}

/// A TLS-ALPN-01 certificate's file (certificate and key in one PEM, so a reader never pairs
/// one with another's key). `domain` is checked by [`is_domain`]: no `/`, so it stays a file name.
fn alpn_file(storage: &Path, domain: &str) -> PathBuf {
    storage
        .join("challenges")
        .join(format!("tls-alpn-01.{domain}.pem"))
}

/// A lower-case DNS name as a client's SNI may carry it; anything else is never a file name.
fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && !d.starts_with('.')
        && d.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl Challenges {
    fn add_storage(&self, storage: &Path) {
        if let Ok(mut s) = self.storages.write() {
            if !s.iter().any(|p| p == storage) {
                s.push(storage.to_path_buf());
            }
        }
    }

    fn insert(&self, storage: &Path, token: &str, key_authorization: &str) -> Result<(), String> {
        if !is_token(token) {
            return Err(format!("the CA sent an invalid http-01 token `{token}`"));
        }
        if let Ok(mut t) = self.pending.write() {
            t.insert(token.to_string(), key_authorization.to_string());
        }
        let dir = storage.join("challenges");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write_private(
            &challenge_file(storage, token),
            key_authorization.as_bytes(),
        )
    }

    fn remove(&self, storage: &Path, token: &str) {
        if let Ok(mut t) = self.pending.write() {
            t.remove(token);
        }
        let _ = std::fs::remove_file(challenge_file(storage, token));
    }

    fn insert_alpn(
        &self,
        storage: &Path,
        domain: &str,
        pem: &str,
        key: Arc<CertifiedKey>,
    ) -> Result<(), String> {
        if !is_domain(domain) {
            return Err(format!("cannot answer tls-alpn-01 for `{domain}`"));
        }
        if let Ok(mut t) = self.alpn.write() {
            t.insert(domain.to_string(), key);
        }
        let dir = storage.join("challenges");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write_private(&alpn_file(storage, domain), pem.as_bytes())
    }

    fn remove_alpn(&self, storage: &Path, domain: &str) {
        if let Ok(mut t) = self.alpn.write() {
            t.remove(domain);
        }
        if is_domain(domain) {
            let _ = std::fs::remove_file(alpn_file(storage, domain));
        }
    }

    /// The TLS-ALPN-01 certificate for a validation handshake naming `sni`, if an order of this
    /// process or of another agent sharing a storage directory is pending for it. (Read from
    /// the storage synchronously: the certificate resolver is not async, and only a validator's
    /// handshake, offering `acme-tls/1`, gets here.)
    pub fn alpn_certificate(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let domain = sni.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&domain) {
            return None;
        }
        if let Some(k) = self.alpn.read().ok()?.get(&domain).cloned() {
            return Some(k);
        }
        let storages = self.storages.read().ok()?.clone();
        storages.iter().find_map(|storage| {
            let pem = std::fs::read(alpn_file(storage, &domain)).ok()?;
            crate::tls::certified_from_pem(&pem).ok()
        })
    }

    /// The key authorization to answer `GET path` with, if `path` is a pending challenge of this
    /// process or of another agent sharing a storage directory.
    pub async fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        if !is_token(token) {
            return None;
        }
        if let Some(k) = self.pending.read().ok()?.get(token).cloned() {
            return Some(k);
        }
        let storages = self.storages.read().ok()?.clone();
        for storage in storages {
            if let Ok(k) = tokio::fs::read_to_string(challenge_file(&storage, token)).await {
                return Some(k);
            }
        }
        None
    }
}

/// A certificate and its key as stored and served.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM chain, leaf first.
    pub chain_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// The leaf's notAfter (Unix seconds).
    pub not_after: i64,
    /// The leaf's serial number (hex, no leading zeros), for the logs.
    pub serial: String,
}

impl Issued {
    /// Parses the leaf of `chain_pem`; checks that `key_pem` holds a private key.
    fn parse(chain_pem: String, key_pem: String) -> Result<(Issued, Vec<String>), String> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("no private key: {e}"))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
            .map_err(|e| format!("no PEM certificate: {e}"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let issued = Issued {
            not_after: cert.validity().not_after.timestamp(),
            serial: cert.serial.to_str_radix(16),
            chain_pem,
            key_pem,
        };
        Ok((issued, names))
    }
}

/// What a new certificate is handed to: the TLS certificate table.
pub type Publish = Arc<dyn Fn(&AcmeConfig, &Issued) + Send + Sync>;

/// The background service of one `acme` section.
pub struct AcmeService {
    config: AcmeConfig,
    publish: Publish,
    current: ArcSwapOption<Issued>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why the stored certificate is not good enough, or `None` if it is.
fn due(config: &AcmeConfig, issued: &Issued, names: &[String], now: i64) -> Option<String> {
    if let Some(missing) = config.domains.iter().find(|d| !names.contains(d)) {
        return Some(format!("it does not name {missing}"));
    }
    let left = issued.not_after - now;
    if left <= config.renew_before.as_secs() as i64 {
        return Some(format!(
            "it expires in {} (renew_before is {})",
            humantime::format_duration(Duration::from_secs(left.max(0) as u64)),
            humantime::format_duration(config.renew_before)
        ));
    }
    None
}

impl AcmeService {
    /// A service that keeps `config`'s certificate valid and hands each one to `publish`.
    pub fn new(config: AcmeConfig, publish: Publish) -> Self {
        challenges().add_storage(&config.storage);
        AcmeService {
            config,
            publish,
            current: ArcSwapOption::empty(),
        }
    }

    /// The stored certificate, if readable; with its DNS names.
    fn stored(&self) -> Result<Option<(Issued, Vec<String>)>, String> {
        let read = |p: PathBuf| match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        };
        let (Some(chain), Some(key)) = (
            read(self.config.cert_path())?,
            read(self.config.key_path())?,
        ) else {
            return Ok(None);
        };
        Issued::parse(chain, key)
            .map(Some)
            .map_err(|e| format!("{}: {e}", self.config.cert_path().display()))
    }

    fn install(&self, issued: Issued) {
        let same = self
            .current
            .load()
            .as_ref()
            .is_some_and(|c| c.serial == issued.serial);
        if same {
            return;
        }
        counters()
            .acme_expiry
            .with_label_values(&[self.config.name()])
            .set(issued.not_after);
        (self.publish)(&self.config, &issued);
        tracing::info!(domains = ?self.config.domains, serial = %issued.serial, not_after = issued.not_after, "acme: certificate in use");
        self.current.store(Some(Arc::new(issued)));
    }

    /// Uses the stored certificate if it is good; otherwise orders one (under the storage lock).
    /// Returns whether a certificate is in place that is not due.
    async fn check(&self) -> Result<(), String> {
        if let Ok(Some((issued, names))) = self.stored() {
            let why = due(&self.config, &issued, &names, now_unix());
            // Even a due certificate serves until its replacement exists.
            self.install(issued);
            if why.is_none() {
                return Ok(());
            }
        }
        std::fs::create_dir_all(self.config.storage.join(self.config.name()))
            .map_err(|e| format!("storage {}: {e}", self.config.storage.display()))?;
        let _lock = self.lock().await?;
        // Another agent sharing the storage may have issued while this one waited.
        match self.stored() {
            Ok(Some((issued, names))) => match due(&self.config, &issued, &names, now_unix()) {
                None => {
                    self.install(issued);
                    return Ok(());
                }
                Some(why) => {
                    tracing::info!(domains = ?self.config.domains, "acme: ordering a certificate: the stored one is due: {why}");
                }
            },
            Ok(None) => {
                tracing::info!(domains = ?self.config.domains, "acme: ordering a certificate: none stored")
            }
            Err(e) => {
                tracing::warn!(domains = ?self.config.domains, "acme: ordering a certificate: the stored one is unusable: {e}")
            }
        }
        let result = tokio::time::timeout(ORDER_TIMEOUT, self.order()).await;
        let result = result.unwrap_or_else(|_| {
            Err(format!(
                "no certificate within {}",
                humantime::format_duration(ORDER_TIMEOUT)
            ))
        });
        match result {
            Ok(issued) => {
                counters().acme_orders_ok.inc();
                self.install(issued);
                Ok(())
            }
            Err(e) => {
                counters().acme_orders_error.inc();
                Err(e)
            }
        }
    }

    /// Holds `<storage>/<name>.lock` (flock): agents sharing the storage order one at a time,
    /// and a dead holder's lock goes with its process.
    async fn lock(&self) -> Result<nix::fcntl::Flock<File>, String> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.config.lock_path();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("lock {}: {e}", path.display()))?;
        let mut waited = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if !waited {
                        tracing::info!(lock = %path.display(), "acme: another agent is ordering this certificate; waiting for it");
                        waited = true;
                    }
                    file = f;
                    tokio::time::sleep(LOCK_POLL).await;
                }
                Err((_, e)) => return Err(format!("lock {}: {e}", path.display())),
            }
        }
    }

    async fn account(&self) -> Result<Account, String> {
        #[derive(Serialize, Deserialize)]
        struct Stored {
            directory: String,
            credentials: AccountCredentials,
        }
        let builder = || {
            match &self.config.directory_ca {
                Some(ca) => Account::builder_with_root(ca),
                None => Account::builder(),
            }
            .map_err(|e| format!("ACME client: {e}"))
        };
        let path = self.config.account_path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<Stored>(&text) {
                Ok(s) if s.directory == self.config.directory => {
                    return builder()?
                        .from_credentials(s.credentials)
                        .await
                        .map_err(|e| format!("account from {}: {e}", path.display()));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("acme: {}: {e}; registering a new account", path.display())
                }
            }
        }
        let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(|e| format!("new account at {}: {e}", self.config.directory))?;
        let stored = Stored {
            directory: self.config.directory.clone(),
            credentials,
        };
        let json = serde_json::to_string(&stored).map_err(|e| e.to_string())?;
        write_private(&path, json.as_bytes())?;
        Ok(account)
    }

    async fn order(&self) -> Result<Issued, String> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            Ok(order) => order,
            Err(e) => {
                // The CA forgot the stored account (a reset test CA, a deactivated account):
                // the next attempt registers a new one.
                if matches!(&e, instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| t.ends_with(":accountDoesNotExist")))
                {
                    let _ = std::fs::remove_file(self.config.account_path());
                }
                return Err(format!("new order: {e}"));
            }
        };
        let mut tokens = Tokens {
            storage: &self.config.storage,
            tokens: Vec::new(),
            domains: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(format!(
                        "authorization for {:?} is {other:?}",
                        authz.identifier()
                    ))
                }
            }
            let domain = match authz.identifier().identifier {
                Identifier::Dns(d) => d.to_ascii_lowercase(),
                other => return Err(format!("authorization for {other:?}: not a DNS name")),
            };
            let mut challenge = match self.config.challenge {
                ChallengeKind::Http01 => {
                    let challenge = authz
                        .challenge(ChallengeType::Http01)
                        .ok_or_else(|| "the CA offers no http-01 challenge".to_string())?;
                    tokens.tokens.push(challenge.token.clone());
                    challenges().insert(
                        &self.config.storage,
                        &challenge.token,
                        challenge.key_authorization().as_str(),
                    )?;
                    challenge
                }
                ChallengeKind::TlsAlpn01 => {
                    let challenge = authz
                        .challenge(ChallengeType::TlsAlpn01)
                        .ok_or_else(|| "the CA offers no tls-alpn-01 challenge".to_string())?;
                    let (pem, key) = crate::tls::acme_alpn_certificate(
                        &domain,
                        challenge.key_authorization().digest().as_ref(),
                    )?;
                    tokens.domains.push(domain.clone());
                    challenges().insert_alpn(&self.config.storage, &domain, &pem, key)?;
                    challenge
                }
            };
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("challenge: {e}"))?;
        }
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(|e| format!("validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("order is {status:?} after validation"));
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| format!("certificate: {e}"))?;
        drop(tokens);
        let (issued, _) = Issued::parse(chain_pem, key_pem)
            .map_err(|e| format!("the issued certificate: {e}"))?;
        write_private(&self.config.key_path(), issued.key_pem.as_bytes())?;
        write_private(&self.config.cert_path(), issued.chain_pem.as_bytes())?;
        tracing::info!(domains = ?self.config.domains, serial = %issued.serial, "acme: certificate issued and stored");
        Ok(issued)
    }
}

/// The challenges of one order, taken out of the table however the order ends.
struct Tokens<'a> {
    storage: &'a Path,
    tokens: Vec<String>,
    /// TLS-ALPN-01 challenges, by domain.
    domains: Vec<String>,
}

impl Drop for Tokens<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            challenges().remove(self.storage, t);
        }
        for d in &self.domains {
            challenges().remove_alpn(self.storage, d);
        }
    }
}

/// Writes `path` readable by the owner only, through a temporary file and a rename, so that an
/// agent reading the store never sees half a file.
fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}

#[async_trait]
impl BackgroundService for AcmeService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut failures = 0u32;
        loop {
            let wait = match self.check().await {
                Ok(()) => {
                    failures = 0;
                    self.config.check_interval
                }
                Err(e) => {
                    let first = FIRST_BACKOFF.min(self.config.check_interval);
                    let wait = first
                        .saturating_mul(1u32 << failures.min(16))
                        .min(MAX_BACKOFF.max(first));
                    failures = failures.saturating_add(1);
                    tracing::error!(domains = ?self.config.domains, directory = %self.config.directory, retry_in = %humantime::format_duration(wait), "acme: {e}");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AcmeConfig, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = parse("{directory: 'https://ca/dir', domains: [A.example.com.], storage: s}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.domains, vec!["a.example.com".to_string()]);
        assert_eq!(c.renew_before, Duration::from_secs(30 * 86400));
        for (yaml, want) in [
            (
                "{directory: 'http://ca/dir', domains: [a.b], storage: s}",
                "not an https:// URL",
            ),
            (
                "{directory: 'https://ca/dir', domains: [], storage: s}",
                "at least one",
            ),
            (
                "{directory: 'https://ca/dir', domains: ['*.b.c'], storage: s}",
                "wildcard",
            ),
            (
                "{directory: 'https://ca/dir', domains: [a.b, A.b], storage: s}",
                "twice",
            ),
            (
                "{directory: 'https://ca/dir', domains: [a_b.c], storage: s}",
                "not a DNS name",
            ),
            (
                "{directory: 'https://ca/dir', domains: [a.b], storage: s, email: x}",
                "e-mail",
            ),
            (
                "{directory: 'https://ca/dir', domains: [a.b], storage: s, check_interval: 0s}",
                "more than 0",
            ),
        ] {
            let e = parse(yaml).err().unwrap_or_default();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[tokio::test]
    async fn challenge_answers_only_pending_tokens() {
        let dir = std::env::temp_dir().join(format!("gopush-acme-unit-{}", std::process::id()));
        let url = |t: &str| format!("{CHALLENGE_PREFIX}{t}");
        challenges()
            .insert(&dir, "tok-1", "tok-1.thumb")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            challenges().answer(&url("tok-1")).await.as_deref(),
            Some("tok-1.thumb")
        );
        // Another agent's challenge, found in the shared storage.
        std::fs::write(challenge_file(&dir, "tok-2"), "tok-2.other")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(challenges().answer(&url("tok-2")).await, None);
        challenges().add_storage(&dir);
        assert_eq!(
            challenges().answer(&url("tok-2")).await.as_deref(),
            Some("tok-2.other")
        );
        drop(Tokens {
            storage: &dir,
            tokens: vec!["tok-1".into(), "tok-2".into()],
            domains: Vec::new(),
        });
        assert_eq!(challenges().answer(&url("tok-1")).await, None);
        assert_eq!(challenges().answer(&url("tok-2")).await, None);
        assert_eq!(challenges().answer("/tok-1").await, None);
        assert_eq!(challenges().answer(&url("../account.json")).await, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tls_alpn_certificate_is_found_in_a_shared_storage_and_only_for_a_domain() {
        let dir = std::env::temp_dir().join(format!("gopush-acme-alpn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("challenges")).unwrap_or_else(|e| panic!("{e}"));
        let digest = [7u8; 32];
        let (pem, _) = crate::tls::acme_alpn_certificate("x.example", &digest)
            .unwrap_or_else(|e| panic!("{e}"));
        // Another agent sharing the storage wrote it; this process has no order of its own.
        write_private(&alpn_file(&dir, "x.example"), pem.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            challenges().alpn_certificate("x.example").is_none(),
            "storage not known yet"
        );
        challenges().add_storage(&dir);
        assert!(
            challenges().alpn_certificate("X.Example.").is_some(),
            "SNI is case-insensitive"
        );
        for bad in ["../x.example", "x.example/..", "", "y.example"] {
            assert!(challenges().alpn_certificate(bad).is_none(), "{bad:?}");
        }
        challenges().remove_alpn(&dir, "x.example");
        assert!(
            challenges().alpn_certificate("x.example").is_none(),
            "removed with the order"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
