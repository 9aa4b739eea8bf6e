//! The auth-callback uid source, like nginx's `auth_request`: the agent asks the user's own app
//! who this is.
//!
//! `{callback: {url: http://127.0.0.1:3000/whoami, forward: [cookie, authorization]}}` sends
//! `GET /whoami` to the app with only the listed request headers (the credentials). The app
//! answers `200` with the uid in the `x-uid` header or a JSON body `{"uid": ...}`, or `401`/`403`
//! to refuse. Answers are cached per exact credential values for `cache` (both kinds: a refused
//! credential is not asked again for that long either). Timeouts, connection errors and other
//! answers fail the request with `on_error` (503 by default) and are never cached.
//!
//! The cache key is every forwarded header's name and values, byte for byte. The cache hashes
//! it, so a stored entry also keeps the full key and is only used when it is equal: a hash
//! collision can never hand one user's answer to another. Because only the credentials are
//! sent, the app's answer may depend on nothing else, which is what makes caching sound.
//!
//! The HTTP client is Pingora's own HTTP/1 connector (pooled keep-alive connections).

use crate::metrics::counters;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use pingora_memory_cache::MemoryCache;
use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Largest answer body read (a uid in JSON is a few dozen bytes).
const MAX_BODY: usize = 64 << 10;
/// How long an idle connection to the app is kept for reuse.
const IDLE: Duration = Duration::from_secs(30);

/// The `callback` uid source as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackSource {
    /// `http://IP:port/path`: a literal address (no DNS on the request path).
    #[serde(deserialize_with = "callback_url")]
    pub url: CallbackUrl,
    /// Request headers that carry the credentials; only these are sent to the app.
    #[serde(deserialize_with = "header_names")]
    pub forward: Vec<http::HeaderName>,
    /// Budget of one question, connect to last byte.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long an answer is reused for the same credentials (`0s`: never).
    #[serde(default = "default_cache", with = "humantime_serde")]
    pub cache: Duration,
    /// Bound of the cache, in answers.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Status when the app cannot be asked (timeout, refused connection, an unusable answer):
    /// 503 (try later) or 430 (treat as no uid).
    #[serde(default = "default_on_error", deserialize_with = "error_status")]
    pub on_error: u16,
    /// The answer header holding the uid.
    #[serde(default = "default_uid_header", deserialize_with = "header_name")]
    pub uid_header: http::HeaderName,
}

/// A parsed callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub path: String,
    text: String,
}

impl fmt::Display for CallbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_cache() -> Duration {
    Duration::from_secs(30)
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_on_error() -> u16 {
    503
}
fn default_uid_header() -> http::HeaderName {
    http::HeaderName::from_static("x-uid")
}

fn header_name<'de, D: Deserializer<'de>>(d: D) -> Result<http::HeaderName, D::Error> {
    let s = String::deserialize(d)?;
    http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| de::Error::custom(format!("`{s}` is not a valid header name")))
}

fn header_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<http::HeaderName>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.is_empty() {
        return Err(de::Error::custom(
            "name at least one header carrying the credentials (e.g. [cookie, authorization])",
        ));
    }
    list.iter()
        .map(|s| {
            http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
                .map_err(|_| de::Error::custom(format!("`{s}` is not a valid header name")))
        })
        .collect()
}

fn error_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let s = u16::deserialize(d)?;
    if !(400..=599).contains(&s) {
        return Err(de::Error::custom(format!(
            "{s} is not an error status (400..=599; usually 503 or 430)"
        )));
    }
    Ok(s)
}

fn callback_url<'de, D: Deserializer<'de>>(d: D) -> Result<CallbackUrl, D::Error> {
    let text = String::deserialize(d)?;
    parse_url(&text).map_err(de::Error::custom)
}

/// Parses `http://IP[:port]/path`.
pub fn parse_url(text: &str) -> Result<CallbackUrl, String> {
    let uri: http::Uri = text.parse().map_err(|_| format!("`{text}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "`{text}`: only http:// is supported (the app is local)"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{text}` has no host"))?;
    let host = authority.host();
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            format!("`{text}`: the host must be a literal IP address (no DNS on the request path)")
        })?;
    let port = authority.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Ok(CallbackUrl {
        addr: SocketAddr::new(ip, port),
        host: authority.as_str().to_string(),
        path: if path.is_empty() { "/".into() } else { path },
        text: text.to_string(),
    })
}

impl fmt::Display for CallbackSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "auth callback {}", self.url)
    }
}

/// The credentials of one request: what is sent, and the exact cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    key: Vec<u8>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Credentials {
    /// The cache key: names and values, unambiguous (values contain neither NUL nor LF).
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// The app's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It named the user.
    Uid(Arc<str>),
    /// It refused the credentials (401/403).
    Rejected,
    /// It could not be asked or answered something unusable; nothing is cached.
    Failed,
}

struct Cached {
    key: Vec<u8>,
    answer: Answer,
}

/// A callback source ready to ask: connection pool and answer cache.
pub struct CallbackClient {
    source: CallbackSource,
    connector: Connector,
    cache: Option<MemoryCache<Vec<u8>, Arc<Cached>>>,
}

impl fmt::Debug for CallbackClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackClient")
            .field("url", &self.source.url.text)
            .finish_non_exhaustive()
    }
}

impl CallbackClient {
    /// A client for `source`, with an empty cache.
    pub fn new(source: &CallbackSource) -> Self {
        let cache = (source.cache > Duration::ZERO && source.cache_entries > 0)
            .then(|| MemoryCache::new(source.cache_entries));
        CallbackClient {
            source: source.clone(),
            connector: Connector::new(None),
            cache,
        }
    }

    /// The status to answer when the app cannot be asked.
    pub fn on_error(&self) -> u16 {
        self.source.on_error
    }

    /// The credentials in `req`, or `None` when it carries none of the forwarded headers (then
    /// this source has nothing to ask about and the next source is tried).
    pub fn credentials(&self, req: &RequestHeader) -> Option<Credentials> {
        let mut key = Vec::new();
        let mut headers = Vec::new();
        for name in &self.source.forward {
            key.extend_from_slice(name.as_str().as_bytes());
            key.push(0);
            for v in req.headers.get_all(name) {
                key.extend_from_slice(v.as_bytes());
                key.push(b'\n');
                headers.push((name.clone(), v.clone()));
            }
            key.push(0);
        }
        (!headers.is_empty()).then_some(Credentials { key, headers })
    }

    /// The cached answer for exactly these credentials, if any.
    pub fn cached(&self, creds: &Credentials) -> Option<Answer> {
        let (hit, _) = self.cache.as_ref()?.get(creds.key.as_slice());
        // The cache is keyed by a hash of the key: check the key itself.
        hit.filter(|c| c.key == creds.key).map(|c| c.answer.clone())
    }

    /// Asks the app (or the cache) about `creds`; never longer than the configured timeout.
    pub async fn ask(&self, creds: &Credentials) -> Answer {
        let c = counters();
        if let Some(answer) = self.cached(creds) {
            c.callback_cache_hits.inc();
            return answer;
        }
        c.callback_requests.inc();
        let answer = match tokio::time::timeout(self.source.timeout, self.request(creds)).await {
            Ok(Ok(a)) => a,
            Ok(Err(why)) => {
                tracing::warn!(target: "gopush::uid", url = %self.source.url, "auth callback failed: {why}");
                Answer::Failed
            }
            Err(_) => {
                tracing::warn!(target: "gopush::uid", url = %self.source.url, "auth callback timed out after {:?}", self.source.timeout);
                Answer::Failed
            }
        };
        match &answer {
            Answer::Failed => c.callback_errors.inc(),
            Answer::Rejected => c.callback_rejected.inc(),
            Answer::Uid(_) => {}
        }
        if let (Some(cache), Answer::Uid(_) | Answer::Rejected) = (&self.cache, &answer) {
            let entry = Arc::new(Cached {
                key: creds.key.clone(),
                answer: answer.clone(),
            });
            cache.put(creds.key.as_slice(), entry, Some(self.source.cache));
        }
        answer
    }

    async fn request(&self, creds: &Credentials) -> Result<Answer, String> {
        let mut peer = HttpPeer::new(self.source.url.addr, false, String::new());
        peer.options.connection_timeout = Some(self.source.timeout);
        peer.options.read_timeout = Some(self.source.timeout);
        peer.options.write_timeout = Some(self.source.timeout);
        // A pooled connection the app has closed in the meantime fails on first use: one more
        // try on a fresh connection.
        let mut last = String::new();
        for _attempt in 0..2 {
            let (mut http, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.source.url.addr))?;
            let mut req = RequestHeader::build("GET", self.source.url.path.as_bytes(), None)
                .map_err(|e| e.to_string())?;
            req.insert_header(http::header::HOST, self.source.url.host.as_str())
                .map_err(|e| e.to_string())?;
            for (name, value) in &creds.headers {
                req.append_header(name.clone(), value.clone())
                    .map_err(|e| e.to_string())?;
            }
            match exchange(&mut http, req, &self.source.uid_header).await {
                Ok((status, uid_header, body)) => {
                    if body.is_some() {
                        self.connector
                            .release_http_session(http, &peer, Some(IDLE))
                            .await;
                    }
                    return self.interpret(status, uid_header, body.as_deref());
                }
                Err(e) if reused => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn interpret(
        &self,
        status: u16,
        uid_header: Result<Option<http::HeaderValue>, String>,
        body: Option<&[u8]>,
    ) -> Result<Answer, String> {
        match status {
            200 => {}
            401 | 403 => return Ok(Answer::Rejected),
            other => return Err(format!("the app answered {other}")),
        }
        if let Some(v) = uid_header? {
            let s = std::str::from_utf8(v.as_bytes())
                .map_err(|_| format!("`{}` is not UTF-8", self.source.uid_header))?
                .trim();
            if !s.is_empty() {
                return Ok(Answer::Uid(s.into()));
            }
        }
        let body = body.ok_or("200 with a body too large to hold a uid")?;
        let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
            format!(
                "200 without a `{}` header nor a JSON body {{\"uid\": ...}}",
                self.source.uid_header
            )
        })?;
        match json.get("uid") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {
                Ok(Answer::Uid(s.as_str().into()))
            }
            Some(serde_json::Value::Number(n)) => Ok(Answer::Uid(n.to_string().into())),
            _ => Err("200 whose JSON body has no usable `uid`".into()),
        }
    }
}

/// The uid header of an answer, or why it cannot be trusted: sent on several lines (which is
/// the uid?) or folded over several lines with obs-fold (`x-uid: alice` + `\r\n victim`, which
/// Pingora's parser would join into `alice victim`). Answers are read from the raw head because
/// the parsed one no longer shows the fold.
fn uid_header_of(
    head: &pingora::http::ResponseHeader,
    raw_head: &[u8],
    name: &http::HeaderName,
) -> Result<Option<http::HeaderValue>, String> {
    let mut values = head.headers.get_all(name).iter();
    let first = values.next().cloned();
    if values.next().is_some() {
        return Err(format!(
            "several `{name}` header lines in the answer: refused (send one)"
        ));
    }
    if first.is_some() {
        // Skip the status line; a line starting with SP or HTAB continues the previous header.
        let mut current_is_uid = false;
        for line in raw_head.split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if current_is_uid {
                    return Err(format!(
                        "`{name}` is folded over several lines (obs-fold) in the answer: refused"
                    ));
                }
                continue;
            }
            let field = line.split(|&b| b == b':').next().unwrap_or_default();
            current_is_uid = field
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes());
        }
    }
    Ok(first)
}

/// The status, the uid header (see [`uid_header_of`]) and the body (`None` if it was too large).
type Exchanged = (
    u16,
    Result<Option<http::HeaderValue>, String>,
    Option<Bytes>,
);

/// Sends `req` and reads status, the uid header and the body (`None` if it was too large, in
/// which case the connection must not be reused).
async fn exchange(
    http: &mut pingora::protocols::http::v1::client::HttpSession,
    req: RequestHeader,
    uid_header: &http::HeaderName,
) -> Result<Exchanged, String> {
    http.write_request_header(Box::new(req))
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    http.read_response()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let header = http.resp_header().ok_or("no answer header")?;
    let status = header.status.as_u16();
    // `read_response` succeeded, so the raw head is there.
    let uid = uid_header_of(header, &http.get_headers_raw_bytes(), uid_header);
    let mut body = BytesMut::new();
    while let Some(chunk) = http
        .read_body_bytes()
        .await
        .map_err(|e| format!("reading the answer body: {e}"))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok((status, uid, None));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, uid, Some(body.freeze())))
}

#[cfg(test)]
mod tests;
