//! Uid resolution: which user is this request for?
//!
//! First step of the request path (`request_filter`). The declarative sources (cookie, query,
//! header) are pure functions over the request head with no allocation: the resolved uid borrows
//! from the request. Such a uid is used exactly as the client sent it (a cookie or query value is
//! *not* percent-decoded), because that is what nginx's `$cookie_uid` / `$arg_uid` hash, and
//! placement must agree with nginx's `hash ... consistent`.
//!
//! A signed token ([`crate::jwt`]) is verified here too (CPU only); its claim is an owned uid. An
//! auth callback ([`crate::callback`]) needs I/O, so [`UidResolver::next`] stops at it and hands
//! it to the caller ([`Step::Ask`]), which asks and, when the request carries no credentials for
//! it, continues with the following source.

use crate::callback::CallbackClient;
use crate::config::{UidConfig, UidSource};
use crate::counters::{bump, metrics};
use pingora::http::RequestHeader;
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

/// A resolved uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uid {
    /// A declarative source's value, borrowed from the request head exactly as sent.
    Span(UidSpan),
    /// A value a token, callback or hook produced; hashed and forwarded as it is.
    Owned(Box<str>),
}

impl Uid {
    /// The uid as hashed (for a span: as sent, still percent-encoded).
    pub fn get<'a>(&'a self, resolver: &UidResolver, req: &'a RequestHeader) -> &'a str {
        match self {
            Uid::Span(span) => span.get(resolver, req),
            Uid::Owned(s) => s,
        }
    }

    /// The uid as the backend receives it: a span's value percent-decoded ([`decode`]), an
    /// owned value unchanged.
    pub fn forwarded<'a>(
        &'a self,
        resolver: &UidResolver,
        req: &'a RequestHeader,
    ) -> std::borrow::Cow<'a, str> {
        match self {
            Uid::Span(span) => {
                let raw = span.get(resolver, req);
                decode(raw).unwrap_or(std::borrow::Cow::Borrowed(raw))
            }
            Uid::Owned(s) => std::borrow::Cow::Borrowed(s),
        }
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

/// The configured uid sources, checked once at start.
#[derive(Debug, Clone)]
pub struct UidResolver {
    sources: Box<[UidSource]>,
    /// The client of each callback source, by source index.
    callbacks: Box<[Option<Arc<CallbackClient>>]>,
    max_len: usize,
    /// "cookie `uid`, query `uid`": for the 430 body, built once.
    described: String,
}

impl UidResolver {
    /// Builds the resolver from the validated configuration.
    pub fn new(config: &UidConfig) -> Self {
        let described = config
            .sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let callbacks = config
            .sources
            .iter()
            .map(|s| match s {
                UidSource::Callback(c) => Some(Arc::new(CallbackClient::new(c))),
                _ => None,
            })
            .collect();
        UidResolver {
            sources: config.sources.clone().into_boxed_slice(),
            callbacks,
            max_len: config.max_len,
            described,
        }
    }

    /// The longest accepted uid.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The client of the callback source at `index` (from [`Step::Ask`]).
    pub fn callback(&self, index: usize) -> Option<&CallbackClient> {
        self.callbacks.get(index).and_then(|c| c.as_deref())
    }

    /// Tries the sources from `from` on, in order: the first that yields a value decides (a
    /// found value is validated; a present but refused token is [`UidError::Rejected`]).
    pub fn next(&self, req: &RequestHeader, from: usize) -> Result<Step, UidError> {
        for (i, source) in self.sources.iter().enumerate().skip(from) {
            match source {
                UidSource::Jwt(jwt) => {
                    let Some(token) = jwt.token(req) else {
                        continue;
                    };
                    let uid = jwt.verify(&token).map_err(|why| {
                        bump(&metrics().jwt_rejected);
                        UidError::Rejected(why)
                    })?;
                    validate_value(&uid, self.max_len)?;
                    return Ok(Step::Found(Uid::Owned(uid.into())));
                }
                UidSource::Callback(_) => return Ok(Step::Ask(i)),
                _ => {
                    if let Some(span) = self.locate_one(req, i, source)? {
                        return Ok(Step::Found(Uid::Span(span)));
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

    /// Finds the uid of `req`: the first non-empty value among the sources, validated.
    pub fn resolve<'r>(&self, req: &'r RequestHeader) -> Result<&'r str, UidError> {
        self.locate(req).map(|span| span.get(self, req))
    }

    /// Like [`UidResolver::resolve`], but answers where the uid is, so that later proxy phases
    /// can borrow it again from the same request head without copying or parsing it again.
    /// Only the declarative sources (cookie, query, header) are tried.
    pub fn locate(&self, req: &RequestHeader) -> Result<UidSpan, UidError> {
        for (i, source) in self.sources.iter().enumerate() {
            if let Some(span) = self.locate_one(req, i, source)? {
                return Ok(span);
            }
        }
        Err(UidError::Missing)
    }

    /// One declarative source (`None` for any other kind).
    fn locate_one(
        &self,
        req: &RequestHeader,
        i: usize,
        source: &UidSource,
    ) -> Result<Option<UidSpan>, UidError> {
        {
            let found = match source {
                UidSource::Cookie(name) => req
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .enumerate()
                    .filter_map(|(n, v)| Some((n, v.to_str().ok()?)))
                    .find_map(|(n, header)| {
                        let v = cookie_in(header, name)?;
                        Some((Origin::Cookie(n as u32), header, v))
                    }),
                UidSource::Query(name) => req
                    .uri
                    .query()
                    .and_then(|q| query_value(q, name).map(|v| (Origin::Query, q, v))),
                UidSource::Header(name) => req
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(|h| (Origin::Header(i as u32), h, h.trim())),
                UidSource::Jwt(_) | UidSource::Callback(_) => None,
            };
            if let Some((origin, base, v)) = found.filter(|(_, _, v)| !v.is_empty()) {
                validate(v, self.max_len)?;
                // `v` is a sub-slice of `base`: its offset is the distance between the pointers.
                let start = v.as_ptr() as usize - base.as_ptr() as usize;
                return Ok(Some(UidSpan {
                    origin,
                    source: i as u32,
                    start: start as u32,
                    end: (start + v.len()) as u32,
                }));
            }
        }
        Ok(None)
    }
}

/// Where in the request head a uid was found (see [`UidResolver::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidSpan {
    origin: Origin,
    /// Index of the configured source that gave the uid (for the per-source metrics).
    source: u32,
    start: u32,
    end: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// In the n-th `Cookie` header.
    Cookie(u32),
    /// In the query string.
    Query,
    /// In the header of the i-th source.
    Header(u32),
}

impl UidSpan {
    /// Index of the configured source that gave the uid.
    pub fn source(&self) -> usize {
        self.source as usize
    }

    /// The uid, borrowed from the request head it was located in. Returns `""` if `req` is not
    /// that request head (a bug, not an input error).
    pub fn get<'r>(&self, resolver: &UidResolver, req: &'r RequestHeader) -> &'r str {
        let base = match self.origin {
            Origin::Cookie(n) => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .nth(n as usize)
                .and_then(|v| v.to_str().ok()),
            Origin::Query => req.uri.query(),
            Origin::Header(i) => match resolver.sources.get(i as usize) {
                Some(UidSource::Header(name)) => {
                    req.headers.get(name).and_then(|v| v.to_str().ok())
                }
                _ => None,
            },
        };
        base.and_then(|b| b.get(self.start as usize..self.end as usize))
            .unwrap_or("")
    }
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

/// Checks a found uid, raw and decoded: bounded length, no control characters, and valid UTF-8
/// once percent-decoded.
pub fn validate(uid: &str, max_len: usize) -> Result<&str, UidError> {
    if uid.len() > max_len {
        return Err(UidError::Invalid("too long"));
    }
    let decoded = decode(uid)?;
    if decoded.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(UidError::Invalid("contains control characters"));
    }
    Ok(uid)
}

/// The uid as the backend receives it: percent-decoded, as `decodeURIComponent` (and so
/// Socket.IO's `handshake.query`) would give it. Borrowed unless the uid contains `%`.
///
/// The *raw* uid stays the hash key (that is what nginx hashes); the backend gets the value the
/// client meant, so `io(url, {query: {uid: "a@b.com"}})` is `a@b.com` behind gopush as without it.
pub fn decode(raw: &str) -> Result<std::borrow::Cow<'_, str>, UidError> {
    if !raw.contains('%') {
        return Ok(std::borrow::Cow::Borrowed(raw));
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
        UidResolver::new(&UidConfig {
            sources,
            ..UidConfig::default()
        })
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
        assert_eq!(default_resolver().resolve(&r), Ok("alice"));
    }

    #[test]
    fn cookie_across_several_headers_first_wins() {
        let r = req("/", &[("cookie", "a=1"), ("cookie", "uid=bob; uid=carol")]);
        assert_eq!(default_resolver().resolve(&r), Ok("bob"));
    }

    #[test]
    fn cookie_quoted_and_percent_encoded_values_are_raw() {
        let r = req("/", &[("cookie", "uid=\"q\"")]);
        assert_eq!(default_resolver().resolve(&r), Ok("\"q\""));
        let r = req("/", &[("cookie", "uid=a%20b")]);
        assert_eq!(default_resolver().resolve(&r), Ok("a%20b"));
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
        assert_eq!(default_resolver().resolve(&r), Err(UidError::Missing));
    }

    #[test]
    fn query_first_duplicate_wins_and_is_not_decoded() {
        let r = req("/socket.io/?EIO=4&uid=u%2F1&uid=u2", &[]);
        assert_eq!(default_resolver().resolve(&r), Ok("u%2F1"));
    }

    #[test]
    fn query_key_must_match_exactly() {
        let r = req("/?xuid=1&uidx=2&uid", &[]);
        assert_eq!(default_resolver().resolve(&r), Err(UidError::Missing));
    }

    #[test]
    fn sources_in_order_cookie_before_query() {
        let r = req("/?uid=q", &[("cookie", "uid=c"), ("x-user-id", "h")]);
        assert_eq!(default_resolver().resolve(&r), Ok("c"));
        let r = req("/?uid=q", &[("x-user-id", "h")]);
        assert_eq!(default_resolver().resolve(&r), Ok("q"));
        let r = req("/", &[("x-user-id", " h ")]);
        assert_eq!(default_resolver().resolve(&r), Ok("h"));
    }

    #[test]
    fn empty_values_fall_through_to_next_source() {
        let r = req("/?uid=q", &[("cookie", "uid=")]);
        assert_eq!(default_resolver().resolve(&r), Ok("q"));
    }

    #[test]
    fn header_only_resolver() {
        let r = req("/?uid=q", &[("cookie", "uid=c")]);
        let res = resolver(vec![UidSource::Header(http::HeaderName::from_static(
            "x-id",
        ))]);
        assert_eq!(res.resolve(&r), Err(UidError::Missing));
        assert_eq!(res.describe_sources(), "header `x-id`");
    }

    #[test]
    fn too_long_and_control_characters_are_invalid() {
        let long = format!("/?uid={}", "a".repeat(257));
        assert_eq!(
            default_resolver().resolve(&req(&long, &[])),
            Err(UidError::Invalid("too long"))
        );
        let ok = format!("/?uid={}", "a".repeat(256));
        assert!(default_resolver().resolve(&req(&ok, &[])).is_ok());
        assert_eq!(
            validate("a\u{1}b", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            validate("a\u{7f}", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            validate("%01x", 256),
            Err(UidError::Invalid("contains control characters"))
        );
        assert_eq!(
            validate("%ff", 256),
            Err(UidError::Invalid("not UTF-8 once percent-decoded"))
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
