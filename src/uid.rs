//! Uid resolution: which user is this request for?
//!
//! First step of the request path (`request_filter`, through [`crate::decide::resolve_uid`]). The
//! declarative sources (cookie, query, header) are pure functions over the request head. What
//! they find becomes one canonical [`Uid`]: decoded as the backend decodes it, with the value as
//! sent kept only as the ring key (see [`Uid`] for why).
//!
//! A signed token ([`crate::jwt`]) is verified here too (CPU only); its claim is an owned uid. An
//! auth callback ([`crate::callback`]) needs I/O, so [`UidResolver::next`] stops at it and hands
//! it to the caller ([`Step::Ask`]), which asks and, when the request carries no credentials for
//! it, continues with the following source.

use crate::callback::CallbackClient;
use crate::config::{UidConfig, UidSource};
use crate::jwt::JwtVerifier;
use pingora::http::RequestHeader;
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// Why no uid could be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidError {
    /// No source yielded a value.
    Missing,
    /// A value was found but is unusable.
    Invalid(&'static str),
    /// Credentials were found and refused (a bad token); answered like a missing uid (430), with
    /// the reason.
    Rejected(&'static str),
}

/// A resolved uid, in its one canonical form.
///
/// Everything that names the user (limits, forwarding, logs, metrics, hooks, push rooms, the sid
/// memory) uses [`Uid::as_str`]: the value decoded as the backend decodes it. Only the ring
/// hashes something else, [`Uid::ring_key`]: for a cookie, query or header source the value
/// exactly as sent, still percent-encoded, because that is what nginx's `$cookie_uid` /
/// `$arg_uid` hash, and placement must agree with nginx's `hash ... consistent`. A value a token,
/// callback or hook produced is used as it is for both. Owned, so it outlives changes to the
/// request head (the upgrade guard edits it) and costs one allocation, two when it was encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uid {
    value: Box<str>,
    /// The ring key where it differs from `value` (a declarative source's value with `%`).
    raw: Option<Box<str>>,
    /// Index of the configured source that gave it (`None`: a hook, or a caller such as
    /// `/api/route`).
    source: Option<usize>,
}

impl Uid {
    /// A value as a client sends it in a cookie or header (percent-encoded), validated and
    /// decoded as `decodeURIComponent` does.
    pub fn from_raw(raw: &str, max_len: usize) -> Result<Uid, UidError> {
        Self::from_encoded(raw, max_len, false)
    }

    /// A query parameter's value, validated and decoded as the backend's query parser
    /// (`URLSearchParams`, Socket.IO's `handshake.query`) decodes it: `+` is a space.
    pub fn from_query(raw: &str, max_len: usize) -> Result<Uid, UidError> {
        Self::from_encoded(raw, max_len, true)
    }

    fn from_encoded(raw: &str, max_len: usize, plus_is_space: bool) -> Result<Uid, UidError> {
        if raw.len() > max_len {
            return Err(UidError::Invalid("too long"));
        }
        let value = if plus_is_space && raw.contains('+') {
            Cow::Owned(decode(&raw.replace('+', " "))?.into_owned())
        } else {
            decode(raw)?
        };
        if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(UidError::Invalid("contains control characters"));
        }
        let raw = matches!(value, Cow::Owned(_)).then(|| Box::from(raw));
        Ok(Uid {
            value: value.into(),
            raw,
            source: None,
        })
    }

    /// A value a token, callback or hook produced: used as it is (never decoded), validated.
    pub fn from_value(value: &str, max_len: usize) -> Result<Uid, UidError> {
        validate_value(value, max_len)?;
        Ok(Uid {
            value: value.into(),
            raw: None,
            source: None,
        })
    }

    /// The same uid, attributed to the configured source at `index`.
    pub fn with_source(mut self, index: usize) -> Uid {
        self.source = Some(index);
        self
    }

    /// The canonical uid: what the backend, the limits, the logs and the hooks see.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// What the ring hashes (see the type's documentation for why it may differ).
    pub fn ring_key(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or(&self.value).as_bytes()
    }

    /// Index of the configured source that gave the uid.
    pub fn source(&self) -> Option<usize> {
        self.source
    }
}

/// Where resolution stands (see [`UidResolver::next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The uid.
    Found(Uid),
    /// The source at this index is an auth callback: ask it ([`UidResolver::callback`]); if the
    /// request has no credentials for it, continue with `next(req, index + 1)`.
    Ask(usize),
}

/// The configured uid sources, built once per snapshot: signed-token sources hold their loaded
/// key, callback sources their HTTP client.
#[derive(Debug)]
pub struct UidResolver {
    sources: Box<[Source]>,
    max_len: usize,
    /// "cookie `uid`, query `uid`": for the 430 body, built once.
    described: String,
}

/// One source, ready for requests.
#[derive(Debug)]
enum Source {
    /// A cookie, query or header source: the value as the client sent it.
    Declared(UidSource),
    /// A signed token, with its key.
    Jwt(Box<JwtVerifier>),
    /// An auth callback (the request path asks it; see [`Step::Ask`]).
    Callback(Arc<CallbackClient>),
}

impl UidResolver {
    /// Builds the resolver from the validated configuration, reading key files relative to
    /// `dir`. Errors are `(key, message)`: a key that cannot be read or parsed.
    pub fn build(config: &UidConfig, dir: &Path) -> Result<Self, (String, String)> {
        let described = config
            .sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let sources = config
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                UidSource::Jwt(jwt) => jwt
                    .verifier(dir)
                    .map(|v| Source::Jwt(Box::new(v)))
                    .map_err(|(field, m)| (format!("uid.sources[{i}].jwt.{field}"), m)),
                UidSource::Callback(c) => Ok(Source::Callback(Arc::new(CallbackClient::new(c)))),
                other => Ok(Source::Declared(other.clone())),
            })
            .collect::<Result<_, _>>()?;
        Ok(UidResolver {
            sources,
            max_len: config.max_len,
            described,
        })
    }

    /// The longest accepted uid.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The client of the callback source at `index` (from [`Step::Ask`]).
    pub fn callback(&self, index: usize) -> Option<&CallbackClient> {
        match self.sources.get(index) {
            Some(Source::Callback(c)) => Some(c),
            _ => None,
        }
    }

    /// Tries the sources from `from` on, in order: the first that yields a value decides (a
    /// found value is validated; a present but refused token is [`UidError::Rejected`]).
    pub fn next(&self, req: &RequestHeader, from: usize) -> Result<Step, UidError> {
        for (i, source) in self.sources.iter().enumerate().skip(from) {
            match source {
                Source::Jwt(jwt) => {
                    let Some(token) = jwt.token(req) else {
                        continue;
                    };
                    let uid = jwt.verify(&token).map_err(|why| {
                        crate::metrics::counters().jwt_rejected.inc();
                        UidError::Rejected(why)
                    })?;
                    return Ok(Step::Found(
                        Uid::from_value(&uid, self.max_len)?.with_source(i),
                    ));
                }
                Source::Callback(_) => return Ok(Step::Ask(i)),
                Source::Declared(source) => {
                    if let Some(raw) = declared(req, source) {
                        let uid = match source {
                            UidSource::Query(_) => Uid::from_query(raw, self.max_len),
                            _ => Uid::from_raw(raw, self.max_len),
                        };
                        return Ok(Step::Found(uid?.with_source(i)));
                    }
                }
            }
        }
        Err(UidError::Missing)
    }

    /// The sources in order, as words for error messages.
    pub fn describe_sources(&self) -> &str {
        &self.described
    }
}

/// The non-empty value a cookie, query or header source finds in `req`, as sent (`None` for any
/// other kind of source).
fn declared<'r>(req: &'r RequestHeader, source: &UidSource) -> Option<&'r str> {
    let found = match source {
        UidSource::Cookie(name) => req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|header| cookie_in(header, name)),
        UidSource::Query(name) => req.uri.query().and_then(|q| query_value(q, name)),
        UidSource::Header(name) => req
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim),
        UidSource::Jwt(_) | UidSource::Callback(_) => None,
    };
    found.filter(|v| !v.is_empty())
}

/// Checks a uid that a token, callback or hook produced (used as it is, never decoded): not
/// empty, bounded length, no control characters (it goes into a header).
pub fn validate_value(uid: &str, max_len: usize) -> Result<&str, UidError> {
    if uid.is_empty() {
        return Err(UidError::Missing);
    }
    if uid.len() > max_len {
        return Err(UidError::Invalid("too long"));
    }
    if uid.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(UidError::Invalid("contains control characters"));
    }
    Ok(uid)
}

/// The uid as the backend receives it: percent-decoded, as `decodeURIComponent` (and so
/// Socket.IO's `handshake.query`) would give it. Borrowed unless the uid contains `%`.
///
/// The *raw* uid stays the hash key (that is what nginx hashes); the backend gets the value the
/// client meant, so `io(url, {query: {uid: "a@b.com"}})` is `a@b.com` behind gopush as without it.
pub fn decode(raw: &str) -> Result<Cow<'_, str>, UidError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| UidError::Invalid("not UTF-8 once percent-decoded"))
}

/// The value of the first cookie called `name` in one `Cookie` header, as sent.
pub fn cookie_in<'h>(header: &'h str, name: &str) -> Option<&'h str> {
    cookie::Cookie::split_parse(header)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .and_then(|c| c.value_raw())
}

/// The value of the first `name=` parameter of a raw query string, as sent (not decoded).
pub fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UidConfig;

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn resolver(sources: Vec<UidSource>) -> UidResolver {
        UidResolver::build(
            &UidConfig {
                sources,
                ..UidConfig::default()
            },
            Path::new(""),
        )
        .unwrap()
    }

    /// What production does with a request: [`UidResolver::next`] from the first source; the
    /// ring key, as text.
    fn key(res: &UidResolver, r: &RequestHeader) -> Result<String, UidError> {
        match res.next(r, 0)? {
            Step::Found(uid) => Ok(String::from_utf8(uid.ring_key().to_vec()).unwrap()),
            Step::Ask(_) => panic!("no callback source here"),
        }
    }

    fn found(res: &UidResolver, r: &RequestHeader) -> Uid {
        match res.next(r, 0) {
            Ok(Step::Found(uid)) => uid,
            other => panic!("{other:?}"),
        }
    }

    fn default_resolver() -> UidResolver {
        resolver(vec![
            UidSource::Cookie("uid".into()),
            UidSource::Query("uid".into()),
            UidSource::Header(http::HeaderName::from_static("x-user-id")),
        ])
    }

    #[test]
    fn cookie_among_several_with_spaces() {
        let r = req("/", &[("cookie", "a=1;  uid=alice ; b=2")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("alice"));
    }

    #[test]
    fn cookie_across_several_headers_first_wins() {
        let r = req("/", &[("cookie", "a=1"), ("cookie", "uid=bob; uid=carol")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("bob"));
    }

    #[test]
    fn cookie_quoted_and_percent_encoded_values_are_raw() {
        let r = req("/", &[("cookie", "uid=\"q\"")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("\"q\""));
        let r = req("/", &[("cookie", "uid=a%20b")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("a%20b"));
        assert_eq!(decode("a%20b").unwrap(), "a b");
        assert_eq!(decode("a%40b.com").unwrap(), "a@b.com");
        assert!(matches!(
            decode("plain").unwrap(),
            std::borrow::Cow::Borrowed("plain")
        ));
    }

    #[test]
    fn cookie_name_is_exact() {
        let r = req("/", &[("cookie", "xuid=1; uidx=2")]);
        assert_eq!(key(&default_resolver(), &r), Err(UidError::Missing));
    }

    #[test]
    fn query_first_duplicate_wins_and_is_not_decoded() {
        let r = req("/socket.io/?EIO=4&uid=u%2F1&uid=u2", &[]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("u%2F1"));
    }

    #[test]
    fn query_key_must_match_exactly() {
        let r = req("/?xuid=1&uidx=2&uid", &[]);
        assert_eq!(key(&default_resolver(), &r), Err(UidError::Missing));
    }

    #[test]
    fn sources_in_order_cookie_before_query() {
        let r = req("/?uid=q", &[("cookie", "uid=c"), ("x-user-id", "h")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("c"));
        let r = req("/?uid=q", &[("x-user-id", "h")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("q"));
        let r = req("/", &[("x-user-id", " h ")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("h"));
    }

    #[test]
    fn empty_values_fall_through_to_next_source() {
        let r = req("/?uid=q", &[("cookie", "uid=")]);
        assert_eq!(key(&default_resolver(), &r).as_deref(), Ok("q"));
    }

    #[test]
    fn header_only_resolver() {
        let r = req("/?uid=q", &[("cookie", "uid=c")]);
        let res = resolver(vec![UidSource::Header(http::HeaderName::from_static(
            "x-id",
        ))]);
        assert_eq!(key(&res, &r), Err(UidError::Missing));
        assert_eq!(res.describe_sources(), "header `x-id`");
    }

    #[test]
    fn too_long_and_control_characters_are_invalid() {
        let long = format!("/?uid={}", "a".repeat(257));
        assert_eq!(
            key(&default_resolver(), &req(&long, &[])),
            Err(UidError::Invalid("too long"))
        );
        let ok = format!("/?uid={}", "a".repeat(256));
        assert!(key(&default_resolver(), &req(&ok, &[])).is_ok());
        assert_eq!(
            Uid::from_raw("a\u{1}b", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            Uid::from_raw("a\u{7f}", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            Uid::from_raw("%01x", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            Uid::from_raw("%ff", 256),
            Err(UidError::Invalid("not UTF-8 once percent-decoded"))
        );
    }

    #[test]
    fn one_canonical_uid_decoded_as_the_backend_decodes_it() {
        // The ring hashes the value as sent (nginx parity); everything else sees it decoded.
        let res = default_resolver();
        let u = found(&res, &req("/", &[("cookie", "uid=b%6Fb")]));
        assert_eq!(u.as_str(), "bob");
        assert_eq!(u.ring_key(), b"b%6Fb");
        assert_eq!(u.source(), Some(0));
        let u = found(&res, &req("/?uid=a+b%2Bc", &[]));
        assert_eq!(
            u.as_str(),
            "a b+c",
            "a query value is form-decoded, as URLSearchParams does"
        );
        assert_eq!(u.ring_key(), b"a+b%2Bc");
        let u = found(&res, &req("/", &[("cookie", "uid=a+b")]));
        assert_eq!(u.as_str(), "a+b", "a cookie value is not form-decoded");
        let u = found(&res, &req("/?uid=%C3%A9", &[]));
        assert_eq!(u.as_str(), "é");
        let plain = found(&res, &req("/?uid=alice", &[]));
        assert_eq!((plain.as_str(), plain.ring_key()), ("alice", &b"alice"[..]));
        // Values from tokens, callbacks and hooks are never decoded.
        let v = Uid::from_value("a%20b", 256).unwrap();
        assert_eq!((v.as_str(), v.ring_key()), ("a%20b", &b"a%20b"[..]));
        assert_eq!(
            Uid::from_value("a\nb", 256),
            Err(UidError::Invalid("contains control characters"))
        );
    }

    #[test]
    fn describes_sources_for_the_430_body() {
        assert_eq!(
            default_resolver().describe_sources(),
            "cookie `uid`, query `uid`, header `x-user-id`"
        );
    }
}
