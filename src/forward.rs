//! What the backend receives: the resolved uid (and only it), and the usual proxy headers.
//!
//! Third step of the request path (`upstream_request_filter`). Any client-sent copy of the
//! forward header or query parameter is removed before the resolved uid is set, so a client can
//! never make the backend believe it is another user.
//!
//! # Encoding of the uid
//!
//! * **Header** (`uid.forward.header`, default `x-gopush-uid`): the uid's UTF-8 bytes, with every
//!   byte outside `0x21..=0x7E` (controls, space, DEL, every byte of a non-ASCII character) and
//!   `%` itself written as `%XX` (upper-case hex). A backend gets the uid back with
//!   `decodeURIComponent(value)` (JavaScript), `url.PathUnescape` (Go),
//!   `urllib.parse.unquote` (Python): percent-decoding only, `+` stays `+`. An ASCII uid without
//!   `%` or space is sent unchanged; `é` is sent as `%C3%A9`, `50%` as `50%25`.
//! * **Query** (`uid.forward.query`, default `uid`): one `uid=<value>` pair at the end of the
//!   query, the value percent-encoded ([`QUERY_VALUE`]) so that a form decoder (WHATWG
//!   `URLSearchParams`, Node `querystring`, Express `qs`, Go `url.ParseQuery`, Python `parse_qs`)
//!   yields exactly the uid.
//!
//! # What is removed from the client's request
//!
//! * Every header whose name equals the forward header's once `_` is read as `-` (case never
//!   matters in header names): `x_gopush_uid`, `X_Gopush-Uid`... Servers that map header names to
//!   CGI-style variables (`HTTP_X_GOPUSH_UID`: CGI, WSGI, Rack, PHP, nginx with
//!   `underscores_in_headers`) cannot tell them apart from the real one.
//! * Every `&`-separated query pair whose name, **decoded as a form decoder does** (`+` as space,
//!   `%XX` as a byte, an invalid `%` escape kept literally, invalid UTF-8 replaced by U+FFFD as
//!   WHATWG and Node do), is the forward name (`uid`, `u%69d`, `%75%69%64`, `ui%64`...) or
//!   starts with the forward name followed by `[` (`uid[]`, `uid[0]`, `uid[x]`, `u%69d%5B%5D`:
//!   `qs` — Express's default query parser — turns them into an array or object called `uid`).
//!   Names are compared case-sensitively, as all those parsers do; `uid.x` is kept (`qs`
//!   `allowDots` is off by default).
//! * `;` is not a separator for WHATWG, Node, `qs` or Go (Go ≥ 1.17 drops a pair that holds
//!   one), but it is for Python < 3.9.2 and a few older frameworks. A pair that holds a `;` and
//!   where one of its `;`-separated pieces has a forward name (`a=1;uid=victim`) is kept with its
//!   `;` written as `%3B`: form decoders see the same name and value as before, and `;`-splitting
//!   parsers no longer see a `uid`.
//!
//! The query is passed on untouched only when it holds exactly one pair with a forward name
//! (bracket variants included), that pair is byte for byte `uid=<encoded uid>` and no pair needs
//! its `;` escaped; otherwise it is rebuilt: every other pair in order (empty pairs dropped), then
//! `uid=<encoded uid>`.

use crate::config::ForwardConfig;
use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};
use pingora::http::RequestHeader;
use pingora::Result;
use std::borrow::Cow;
use std::fmt::Write;

/// Characters escaped when the uid is put in a query value (non-ASCII bytes always are), so that
/// a form decoder's value equals the uid: controls, space, `%` and `+` (decoded), `&` and `;`
/// (separators; `;` only for old parsers), `=` and `#`, and `"`, `<`, `>` (not allowed in a
/// request target).
pub const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>');

/// Characters escaped when the uid is put in the header (non-ASCII bytes always are): controls,
/// space (leading and trailing spaces would be trimmed), DEL and `%`.
pub const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// Sets the uid header and query parameter on the upstream request, replacing client copies
/// (see the module documentation for the encoding and what is removed).
/// `uid` is the decoded uid ([`crate::uid::decode`]).
pub fn set_uid(req: &mut RequestHeader, forward: &ForwardConfig, uid: &str) -> Result<()> {
    if let Some(name) = &forward.header {
        remove_folded_headers(req, name);
        // insert_header replaces every existing value of the header.
        let value: Cow<'_, str> = header_value(uid).into();
        req.insert_header(name.clone(), value.as_ref())?;
    }
    if let Some(param) = &forward.query {
        if let Some(new_uri) = rewrite_query(&req.uri, param, uid) {
            let uri = new_uri.parse().map_err(|_| {
                pingora::Error::explain(pingora::ErrorType::InternalError, "rewritten uri")
            })?;
            req.set_uri(uri);
        }
    }
    Ok(())
}

/// The uid as written in the forward header: see the module documentation.
pub fn header_value(uid: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(uid, HEADER_VALUE)
}

/// Removes every header other than `name` itself whose name is `name` once `_` is read as `-`.
fn remove_folded_headers(req: &mut RequestHeader, name: &http::HeaderName) {
    let folded: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| *k != name && same_folded(k.as_str(), name.as_str()))
        .cloned()
        .collect();
    for k in &folded {
        req.remove_header(k);
    }
}

/// Header names (already lower case) equal once `_` is read as `-`.
fn same_folded(a: &str, b: &str) -> bool {
    let fold = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| fold(x).eq_ignore_ascii_case(&fold(y)))
}

/// What a query pair is to the forward parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    /// Unrelated: kept as it is.
    Other,
    /// Its decoded name is the parameter (or a `qs` bracket variant): dropped.
    Forward,
    /// Holds a `;`-separated piece with a forward name: kept with `;` escaped.
    Semicolon,
}

fn classify(pair: &str, param: &str) -> Pair {
    if is_forward_name(key_of(pair), param) {
        Pair::Forward
    } else if pair.contains(';')
        && pair
            .split(';')
            .any(|piece| is_forward_name(key_of(piece), param))
    {
        Pair::Semicolon
    } else {
        Pair::Other
    }
}

/// Whether the raw query name `raw`, form-decoded, is `param` or `param[...`.
fn is_forward_name(raw: &str, param: &str) -> bool {
    let decoded = form_decode(raw);
    match decoded.strip_prefix(param) {
        Some(rest) => rest.is_empty() || rest.starts_with('['),
        None => false,
    }
}

/// `application/x-www-form-urlencoded` decoding as WHATWG `URLSearchParams` does it: `+` is a
/// space, `%XX` a byte, an invalid escape stays as it is, invalid UTF-8 becomes U+FFFD.
fn form_decode(raw: &str) -> Cow<'_, str> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let plus: Vec<u8> = raw
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    let bytes: Vec<u8> = percent_decode(&plus).collect();
    Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
}

/// The path and query with every pair named `param` (after decoding, see the module
/// documentation) removed and `param=<uid>` appended, or `None` when the query already carries
/// exactly that (the common case of a client sending its own uid in the query: no copy then).
pub fn rewrite_query(uri: &http::Uri, param: &str, uid: &str) -> Option<String> {
    let query = uri.query().unwrap_or("");
    let name: Cow<'_, str> = utf8_percent_encode(param, QUERY_VALUE).into();
    let encoded = utf8_percent_encode(uid, QUERY_VALUE);
    let pairs = || query.split('&').filter(|p| !p.is_empty());
    let mut forward = 0usize;
    let mut canonical = false;
    let mut semicolon = false;
    for pair in pairs() {
        match classify(pair, param) {
            Pair::Other => {}
            Pair::Semicolon => semicolon = true,
            Pair::Forward => {
                forward += 1;
                canonical = pair
                    .strip_prefix(name.as_ref())
                    .and_then(|r| r.strip_prefix('='))
                    .is_some_and(|v| encoded.clone().eq_str(v));
            }
        }
    }
    if forward == 1 && canonical && !semicolon {
        return None;
    }
    let mut out =
        String::with_capacity(uri.path().len() + query.len() + name.len() + uid.len() * 3 + 2);
    out.push_str(uri.path());
    out.push('?');
    for pair in pairs() {
        match classify(pair, param) {
            Pair::Forward => continue,
            Pair::Other => out.push_str(pair),
            Pair::Semicolon => {
                for (i, piece) in pair.split(';').enumerate() {
                    if i > 0 {
                        out.push_str("%3B");
                    }
                    out.push_str(piece);
                }
            }
        }
        out.push('&');
    }
    let _ = write!(out, "{name}={encoded}");
    Some(out)
}

fn key_of(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(k, _)| k)
}

trait EqStr {
    fn eq_str(self, s: &str) -> bool;
}

impl EqStr for percent_encoding::PercentEncode<'_> {
    /// Compares the encoding with `s` without building a string.
    fn eq_str(self, s: &str) -> bool {
        let mut rest = s;
        for piece in self {
            match rest.strip_prefix(piece) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }
}

/// Adds `X-Forwarded-For` (appending to a client-sent chain, as nginx's
/// `$proxy_add_x_forwarded_for`), `X-Real-IP` and `X-Forwarded-Proto` (`https` when the request
/// came over a TLS listener).
pub fn set_proxy_headers(
    req: &mut RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    https: bool,
) -> Result<()> {
    if let Some(ip) = client_ip {
        let ip = http::HeaderValue::try_from(ip.to_string())
            .map_err(|_| pingora::Error::explain(pingora::ErrorType::InternalError, "client ip"))?;
        let xff = match req.headers.get("x-forwarded-for").map(|v| v.as_bytes()) {
            Some(prev) if !prev.is_empty() => {
                let mut chain = Vec::with_capacity(prev.len() + 2 + ip.len());
                chain.extend_from_slice(prev);
                chain.extend_from_slice(b", ");
                chain.extend_from_slice(ip.as_bytes());
                http::HeaderValue::from_bytes(&chain).unwrap_or_else(|_| ip.clone())
            }
            _ => ip.clone(),
        };
        req.insert_header("x-forwarded-for", xff)?;
        req.insert_header("x-real-ip", ip)?;
    }
    req.insert_header("x-forwarded-proto", if https { "https" } else { "http" })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn appends_uid_when_absent() {
        assert_eq!(
            rewrite_query(&uri("/socket.io/?EIO=4&transport=polling"), "uid", "alice").as_deref(),
            Some("/socket.io/?EIO=4&transport=polling&uid=alice")
        );
        assert_eq!(
            rewrite_query(&uri("/x"), "uid", "a").as_deref(),
            Some("/x?uid=a")
        );
    }

    #[test]
    fn replaces_spoofed_copies() {
        assert_eq!(
            rewrite_query(&uri("/?uid=mallory&a=1&uid=eve"), "uid", "alice").as_deref(),
            Some("/?a=1&uid=alice")
        );
        assert_eq!(
            rewrite_query(&uri("/?uid&a=1"), "uid", "alice").as_deref(),
            Some("/?a=1&uid=alice")
        );
    }

    #[test]
    fn keeps_the_query_when_it_already_says_exactly_this() {
        assert_eq!(rewrite_query(&uri("/?a=1&uid=alice"), "uid", "alice"), None);
        assert!(rewrite_query(&uri("/?uid=alice&uid=alice"), "uid", "alice").is_some());
    }

    #[test]
    fn escapes_so_the_backend_decodes_the_raw_uid() {
        assert_eq!(
            rewrite_query(&uri("/"), "uid", "a b&c=%").as_deref(),
            Some("/?uid=a%20b%26c%3D%25")
        );
        assert_eq!(rewrite_query(&uri("/?uid=a%20b"), "uid", "a b"), None);
    }

    #[test]
    fn header_replaces_client_copy() {
        let mut req = RequestHeader::build("GET", b"/?uid=mallory", None).unwrap();
        req.append_header("x-gopush-uid", "mallory").unwrap();
        req.append_header("x-gopush-uid", "eve").unwrap();
        set_uid(&mut req, &ForwardConfig::default(), "alice").unwrap();
        let all: Vec<_> = req.headers.get_all("x-gopush-uid").iter().collect();
        assert_eq!(all, vec!["alice"]);
        assert_eq!(req.uri.to_string(), "/?uid=alice");
    }

    #[test]
    fn non_ascii_uid_is_forwarded_percent_encoded_in_header_and_query() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        set_uid(&mut req, &ForwardConfig::default(), "zoë").unwrap();
        assert_eq!(req.headers["x-gopush-uid"].as_bytes(), b"zo%C3%AB");
        assert_eq!(req.uri.to_string(), "/?uid=zo%C3%AB");
    }

    #[test]
    fn header_encoding() {
        assert_eq!(header_value("alice").to_string(), "alice");
        assert_eq!(
            header_value("a+b/c;d=e&f~!").to_string(),
            "a+b/c;d=e&f~!",
            "printable ASCII other than % is kept"
        );
        assert_eq!(
            header_value(" 50% \u{1}\u{7f}é").to_string(),
            "%2050%25%20%01%7F%C3%A9"
        );
    }

    #[test]
    fn header_names_fold_underscores() {
        assert!(same_folded("x_gopush_uid", "x-gopush-uid"));
        assert!(same_folded("x-gopush_uid", "x-gopush-uid"));
        assert!(same_folded("x-uid", "x_uid"));
        assert!(!same_folded("x-gopush-uid2", "x-gopush-uid"));
        assert!(!same_folded("x.gopush.uid", "x-gopush-uid"));
    }

    #[test]
    fn names_are_compared_form_decoded() {
        for n in [
            "uid",
            "u%69d",
            "%75id",
            "%75%69%64",
            "ui%64",
            "uid[]",
            "uid%5B0%5D",
            "uid%5b",
        ] {
            assert!(is_forward_name(n, "uid"), "{n}");
        }
        for n in [
            "UID", "u+id", "uid+", "uid%20", "uid%ff", "%ffuid", "uid.x", "ui", "uid2", "",
        ] {
            assert!(!is_forward_name(n, "uid"), "{n}");
        }
        assert_eq!(form_decode("a+b%20%zz%ff"), "a b %zz\u{fffd}");
        assert_eq!(classify("a=1;uid=x", "uid"), Pair::Semicolon);
        assert_eq!(classify("uid=x;a=1", "uid"), Pair::Forward);
        assert_eq!(classify("a=1;b=uid", "uid"), Pair::Other);
    }

    #[test]
    fn proxy_headers_chain_xff() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "10.1.1.1").unwrap();
        set_proxy_headers(&mut req, Some("127.0.0.2".parse().unwrap()), false).unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "10.1.1.1, 127.0.0.2");
        assert_eq!(req.headers["x-real-ip"], "127.0.0.2");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        set_proxy_headers(&mut req, None, true).unwrap();
        assert_eq!(req.headers["x-forwarded-proto"], "https");
    }
}
