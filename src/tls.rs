//! TLS listeners: certificates loaded from PEM files, picked per handshake by SNI from a table
//! that a reload swaps whole, and the handshake itself (bounded by `tls.handshake_timeout`).
//!
//! Pingora's listeners are all plain TCP here; the agent's connection wrapper
//! ([`crate::limits::head_deadline::HeadDeadlineApp`]) does the TLS handshake with tokio-rustls
//! and hands Pingora a [`TlsConn`], which reports the ALPN choice (HTTP/2) and a TLS digest as
//! Pingora's own TLS streams do; Pingora's `rustls` feature is not compiled in (see [`conn`] for
//! its per-connection memory cost). Doing it there, not in Pingora's listener, gives the handshake a configurable
//! bound (Pingora 0.9.1 hard-codes 60 s), keeps failed handshakes out of the error log (Pingora
//! logs each at error level: a scan or a flood of half-open handshakes would become a flood of
//! lines) and counts them, and leaves the graceful upgrade's socket hand-over untouched (the
//! sockets are plain TCP to Pingora).

use crate::config::{CertificateFiles, Config, ListenEntry, TlsListen};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One certificate chain with its key, as loaded and checked.
pub struct LoadedCert {
    /// The chain file.
    pub cert_file: PathBuf,
    /// The key file.
    pub key_file: PathBuf,
    /// The DNS names of the leaf's subjectAltName, lower case (`*.example.com` for a wildcard).
    pub names: Vec<String>,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// What the two files held when they were read (`tls.watch`).
    stamps: [Option<Stamp>; 2],
}

/// A file's contents, hashed: what tells a rewritten file from the one that was read. Contents
/// rather than metadata, whose mtime has the kernel tick's granularity: a file rewritten within
/// a tick of the read, to the same length, would look unchanged. The files are a few kB and
/// read once per `tls.watch`; the hash needs no strength (whoever can write them owns the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    fn of_bytes(bytes: &[u8]) -> Stamp {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        bytes.hash(&mut h);
        Stamp(h.finish())
    }

    /// `None` for a file that cannot be read now (it differs from any file that could).
    fn of(path: &Path) -> Option<Stamp> {
        std::fs::read(path).ok().map(|b| Stamp::of_bytes(&b))
    }
}

/// The files of a table's certificates, in order (cert, key, cert, key, ...).
pub type FileStamps = Vec<Option<Stamp>>;

impl LoadedCert {
    /// Its two files as they are on disk now.
    fn on_disk(&self) -> [Option<Stamp>; 2] {
        [Stamp::of(&self.cert_file), Stamp::of(&self.key_file)]
    }
}

impl std::fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert")
            .field("cert_file", &self.cert_file)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The crypto provider pingora's rustls backend uses (ring): one provider in the process.
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Loads and checks one certificate: readable PEM files, a chain, a supported key that matches
/// the leaf, DNS names in the leaf's subjectAltName, and a notAfter later than `now` (Unix
/// seconds). Paths are relative to `base`. The error names the field (`cert` or `key`) and says
/// what is wrong, with the file.
pub fn load_cert(
    files: &CertificateFiles,
    base: &Path,
    now: i64,
) -> Result<LoadedCert, (&'static str, String)> {
    let cert_file = crate::config::normalize(&base.join(&files.cert));
    let key_file = crate::config::normalize(&base.join(&files.key));
    let cert_pem = std::fs::read(&cert_file)
        .map_err(|e| ("cert", format!("cannot read {}: {e}", cert_file.display())))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ("cert", format!("{}: bad PEM: {e}", cert_file.display())))?;
    let Some(leaf) = chain.first() else {
        return Err((
            "cert",
            format!("{}: no CERTIFICATE block", cert_file.display()),
        ));
    };
    let (names, not_after) =
        leaf_facts(leaf).map_err(|e| ("cert", format!("{}: {e}", cert_file.display())))?;
    if not_after <= now {
        return Err((
            "cert",
            format!(
                "{}: the certificate expired on {}",
                cert_file.display(),
                humantime::format_rfc3339_seconds(unix_to_system(not_after))
            ),
        ));
    }
    let key_pem = std::fs::read(&key_file)
        .map_err(|e| ("key", format!("cannot read {}: {e}", key_file.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "key",
            format!(
                "{}: no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
                key_file.display()
            ),
        )
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ("key", format!("{}: unusable key: {e}", key_file.display())))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err((
                "key",
                format!(
                    "{} does not match the certificate {}",
                    key_file.display(),
                    cert_file.display()
                ),
            ))
        }
        // The provider cannot tell (not the case for ring's keys): nothing to report.
        Err(_) => {}
    }
    Ok(LoadedCert {
        cert_file,
        key_file,
        names,
        not_after,
        key: Arc::new(certified),
        stamps: [
            Some(Stamp::of_bytes(&cert_pem)),
            Some(Stamp::of_bytes(&key_pem)),
        ],
    })
}

/// Unix seconds as a `SystemTime` (the epoch for a negative value).
pub fn unix_to_system(secs: i64) -> std::time::SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

/// The leaf's DNS names (subjectAltName) and notAfter.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let names: Vec<String> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Err("the certificate has no DNS name in its subjectAltName".into());
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// A fresh self-signed ECDSA P-256 certificate for `names`, as PEM `(certificate, key)`: what
/// `gopush init` and `gopush demo` serve until a real certificate is configured (made on the
/// user's machine, so no private key ships with gopush).
pub fn self_signed(names: &[&str]) -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key: {e}"))?;
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .map_err(|e| format!("names: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A TLS-ALPN-01 challenge certificate for `domain`: self-signed, with the acmeIdentifier
/// extension holding `digest` (the SHA-256 of the key authorization). Returns it as one PEM
/// (certificate, then key: what other agents sharing the ACME storage read) and as served.
pub fn acme_alpn_certificate(
    domain: &str,
    digest: &[u8],
) -> Result<(String, Arc<CertifiedKey>), String> {
    if digest.len() != 32 {
        return Err(format!(
            "key authorization digest of {} bytes",
            digest.len()
        ));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])
        .map_err(|e| format!("name {domain}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("certificate: {e}"))?;
    let pem = format!("{}{}", cert.pem(), key.serialize_pem());
    let certified = certified_from_pem(pem.as_bytes())?;
    Ok((pem, certified))
}

/// A certificate and its key from one PEM text (the certificate blocks, then the key).
pub fn certified_from_pem(pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no private key: {e}"))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Which certificate answers which name, for one listener.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI.
    no_sni: Option<Arc<CertifiedKey>>,
    /// For a name no certificate has (`tls.default` only).
    unknown: Option<Arc<CertifiedKey>>,
    /// The certificates, for status and metrics.
    pub certs: Vec<Arc<LoadedCert>>,
    /// `tls.default`, as configured.
    pub default_name: Option<String>,
    /// What [`CertTable::load`] built it from, to load it again when its files change.
    source: Option<Arc<TableSource>>,
}

/// A listener's `tls` entry as a table was loaded from it.
#[derive(Debug)]
struct TableSource {
    /// Its index in `listen`, for error keys.
    index: usize,
    tls: TlsListen,
    /// The configuration file's directory (relative paths).
    dir: PathBuf,
}

impl CertTable {
    /// Reads and checks the certificates of `tls` (the `i`-th listen entry; paths relative to
    /// `dir`) and builds its table. Errors are `(key, message)`.
    pub fn load(i: usize, tls: &TlsListen, dir: &Path) -> Result<Self, (String, String)> {
        let now = crate::live::unix_seconds(std::time::SystemTime::now());
        let certs = tls
            .certificates
            .iter()
            .enumerate()
            .map(|(j, files)| {
                load_cert(files, dir, now)
                    .map(Arc::new)
                    .map_err(|(field, m)| (format!("listen[{i}].tls.certificates[{j}].{field}"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut table =
            CertTable::new(tls, certs).map_err(|m| (format!("listen[{i}].tls.default"), m))?;
        table.source = Some(Arc::new(TableSource {
            index: i,
            tls: tls.clone(),
            dir: dir.to_path_buf(),
        }));
        Ok(table)
    }

    /// `tls.watch` of the entry it was loaded from (`None`: not watched).
    pub fn watch(&self) -> Option<Duration> {
        self.source
            .as_ref()
            .map(|s| s.tls.watch)
            .filter(|w| !w.is_zero())
    }

    /// The files of its certificates as they are on disk now, if any differs from what was
    /// read.
    fn changed_on_disk(&self) -> Option<FileStamps> {
        let now: FileStamps = self.certs.iter().flat_map(|c| c.on_disk()).collect();
        let read = self.certs.iter().flat_map(|c| c.stamps);
        (!now.iter().copied().eq(read)).then_some(now)
    }

    /// The table of `tls` with its certificates `certs` (in the order of `tls.certificates`).
    /// Where two certificates have a name, the first listed wins. Fails when `tls.default` names
    /// no certificate.
    pub fn new(tls: &TlsListen, certs: Vec<Arc<LoadedCert>>) -> Result<Self, String> {
        let mut table = CertTable {
            certs,
            default_name: tls.default.clone(),
            ..CertTable::default()
        };
        for cert in &table.certs.clone() {
            for name in &cert.names {
                let map = match name.strip_prefix("*.") {
                    Some(parent) => table.wildcard.entry(parent.to_string()),
                    None => table.exact.entry(name.clone()),
                };
                map.or_insert_with(|| cert.key.clone());
            }
        }
        match &tls.default {
            Some(name) => {
                let key = table
                    .by_name(name)
                    .ok_or_else(|| format!("no certificate covers `{name}`"))?;
                table.no_sni = Some(key.clone());
                table.unknown = Some(key);
            }
            None => table.no_sni = table.certs.first().map(|c| c.key.clone()),
        }
        Ok(table)
    }

    fn by_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        // A wildcard covers exactly one label.
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    /// The certificate for a client that asked for `sni` (`None`: no SNI).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        match sni {
            None => self.no_sni.clone(),
            Some(name) => self.by_name(name).or_else(|| self.unknown.clone()),
        }
    }
}

/// Serves the certificate the `acme` service stored (`cert`, `key` files) on every TLS listener
/// of `listeners`; a certificate that does not load is logged and the served one stays.
pub fn publish_acme(listeners: &Listeners, cert: &Path, key: &Path) {
    let files = CertificateFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    };
    let now = crate::live::unix_seconds(std::time::SystemTime::now());
    match load_cert(&files, Path::new(""), now) {
        Ok(loaded) => {
            let loaded = Arc::new(loaded);
            for listener in listeners.tls() {
                listener.resolver.set_acme(loaded.clone());
            }
        }
        Err((_, message)) => {
            tracing::error!(%message, "acme: the stored certificate does not load; serving the previous one")
        }
    }
}

/// The rustls resolver of one listener: the ACME certificate for its names, else a lookup in
/// the current table of configured certificates.
#[derive(Debug)]
pub struct CertResolver {
    table: ArcSwap<CertTable>,
    /// The certificate the `acme` service keeps valid (`None` until it has one). Set by the
    /// service, not by reloads: a reload swaps the table and leaves this as it is.
    acme: arc_swap::ArcSwapOption<LoadedCert>,
}

impl CertResolver {
    /// Starts with `table`.
    pub fn new(table: CertTable) -> Self {
        CertResolver {
            table: ArcSwap::from_pointee(table),
            acme: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// New handshakes for the ACME certificate's names get `cert` from now on.
    pub fn set_acme(&self, cert: Arc<LoadedCert>) {
        self.acme.store(Some(cert));
    }

    /// The ACME certificate served now, if any.
    pub fn acme(&self) -> Option<Arc<LoadedCert>> {
        self.acme.load_full()
    }

    /// What a client asking for `sni` gets: the ACME certificate for its names (and for clients
    /// without SNI when no configured certificate answers them), else the table's answer.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let acme = self.acme.load();
        if let Some(acme) = acme.as_ref() {
            let ours = match sni {
                Some(name) => {
                    let name = name.trim_end_matches('.');
                    acme.names.iter().any(|n| n.eq_ignore_ascii_case(name))
                }
                None => table.lookup(None).is_none(),
            };
            if ours {
                return Some(acme.key.clone());
            }
        }
        table.lookup(sni)
    }

    /// New handshakes use `table` from now on; open connections keep what they had.
    pub fn store(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }

    /// The current table.
    pub fn table(&self) -> Arc<CertTable> {
        self.table.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // `None` fails the handshake (rustls sends an alert).
        if hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN))
        {
            // A TLS-ALPN-01 validation (RFC 8737): only the challenge certificate answers it.
            return crate::acme::challenges().alpn_certificate(hello.server_name()?);
        }
        self.lookup(hello.server_name())
    }
}

/// A TLS listener as the process runs it.
pub struct TlsListener {
    /// Its socket address.
    pub addr: SocketAddr,
    /// Its certificates (swapped by a reload).
    pub resolver: Arc<CertResolver>,
    /// The handshake.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `tls.handshake_timeout` (restart-only).
    pub handshake_timeout: Duration,
}

impl TlsListener {
    fn new(entry: &ListenEntry, tls: &TlsListen, table: CertTable) -> Result<Self, String> {
        let resolver = Arc::new(CertResolver::new(table));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = if tls.h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        // Last: rustls picks the first of ours the client offers, and only an ACME validator
        // offers this one (it is answered only while a challenge is pending).
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        Ok(TlsListener {
            addr: entry.addr,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: tls.handshake_timeout,
        })
    }
}

/// The process's listeners, as started: which are TLS.
#[derive(Default)]
pub struct Listeners {
    entries: Vec<(SocketAddr, Option<Arc<TlsListener>>)>,
    /// Held by whoever loads and swaps tables (a reload, the file check), so that an older
    /// table never replaces a newer one.
    swapping: std::sync::Mutex<()>,
}

/// What [`Listeners::check_files`] did for one listener.
#[derive(Debug, PartialEq)]
pub enum FilesCheck {
    /// Its files are as they were read (or as they were when they last failed to load).
    Unchanged,
    /// They changed and loaded: new handshakes get them.
    Loaded,
    /// They changed and do not load: `(key, problem)`; the served certificates stay.
    Failed(String, String),
}

impl Listeners {
    /// The listeners of `config`, their certificates read and checked (relative to the
    /// configuration file's directory).
    pub fn new(config: &Config) -> Result<Self, (String, String)> {
        let mut entries = Vec::new();
        for (i, entry) in config.listen.0.iter().enumerate() {
            let tls = match &entry.tls {
                Some(tls) => {
                    let table = CertTable::load(i, tls, config.dir())?;
                    Some(Arc::new(
                        TlsListener::new(entry, tls, table)
                            .map_err(|m| (format!("listen[{i}].tls"), m))?,
                    ))
                }
                None => None,
            };
            entries.push((entry.addr, tls));
        }
        Ok(Listeners {
            entries,
            swapping: Default::default(),
        })
    }

    /// The TLS listener a connection to `local` came in on (`None`: plain).
    pub fn tls_for(&self, local: Option<SocketAddr>) -> Option<&Arc<TlsListener>> {
        let local = local?;
        let i = index_for(self.entries.iter().map(|(a, _)| *a), local)?;
        self.entries.get(i).and_then(|(_, t)| t.as_ref())
    }

    /// Every TLS listener.
    pub fn tls(&self) -> impl Iterator<Item = &Arc<TlsListener>> {
        self.entries.iter().filter_map(|(_, t)| t.as_ref())
    }

    /// Takes the certificates of `config` for the running TLS listeners with the same address;
    /// returns the addresses of running TLS listeners that `config` has no TLS entry for (they
    /// keep their certificates).
    pub fn reload(&self, config: &Config) -> Result<Vec<SocketAddr>, (String, String)> {
        let _swapping = self.swapping.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = Vec::new();
        let mut missing = Vec::new();
        for running in self.tls() {
            let next = config
                .listen
                .0
                .iter()
                .enumerate()
                .find(|(_, e)| e.addr == running.addr);
            match next {
                Some((i, ListenEntry { tls: Some(tls), .. })) => {
                    let table = CertTable::load(i, tls, config.dir())?;
                    tables.push((running.clone(), table));
                }
                _ => missing.push(running.addr),
            }
        }
        // All checked: swap.
        for (listener, table) in tables {
            listener.resolver.store(table);
        }
        Ok(missing)
    }

    /// `tls.watch`: loads `listener`'s certificates again, all or none, from the entry its table
    /// was loaded from, if one of their files changed on disk since it was read. `failed` holds
    /// the files of the last failed attempt: the same files are not tried (and reported) again.
    pub fn check_files(
        &self,
        listener: &TlsListener,
        failed: &mut Option<FileStamps>,
    ) -> FilesCheck {
        let _swapping = self.swapping.lock().unwrap_or_else(|e| e.into_inner());
        let current = listener.resolver.table();
        let Some(source) = current.source.clone() else {
            return FilesCheck::Unchanged;
        };
        let Some(now) = current.changed_on_disk() else {
            *failed = None;
            return FilesCheck::Unchanged;
        };
        if failed.as_ref() == Some(&now) {
            return FilesCheck::Unchanged;
        }
        match CertTable::load(source.index, &source.tls, &source.dir) {
            Ok(table) => {
                *failed = None;
                listener.resolver.store(table);
                FilesCheck::Loaded
            }
            Err((key, message)) => {
                *failed = Some(now);
                FilesCheck::Failed(key, message)
            }
        }
    }
}

/// The entry of `addrs` that a connection to `local` came in on: the same address, else an
/// unspecified address (`0.0.0.0`, `::`) with the same port.
pub fn index_for(
    addrs: impl Iterator<Item = SocketAddr> + Clone,
    local: SocketAddr,
) -> Option<usize> {
    addrs.clone().position(|a| a == local).or_else(|| {
        addrs
            .clone()
            .position(|a| a.port() == local.port() && a.ip().is_unspecified())
    })
}

/// The listen entry of `config` a connection to `local` came in on.
pub fn entry_for(config: &Config, local: Option<SocketAddr>) -> Option<&ListenEntry> {
    let i = index_for(config.listen.0.iter().map(|e| e.addr), local?)?;
    config.listen.0.get(i)
}

mod conn;
pub use conn::TlsConn;

#[cfg(test)]
mod tests;
