//! What the backend receives: the resolved uid (and only it), and the usual proxy headers.
//!
//! Third step of the request path (`upstream_request_filter`). Any client-sent copy of the
//! forward header or query parameter is removed before the resolved uid is set, so a client can
//! never make the backend believe it is another user.

use crate::config::ForwardConfig;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use pingora::http::RequestHeader;
use pingora::Result;
use std::fmt::Write;

/// Characters escaped when the uid is put in a query value, so that the backend's decoded value
/// equals the uid in the header.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'=')
    .add(b'>');

/// Sets the uid header and query parameter on the upstream request, replacing client copies.
/// `uid` is the decoded uid ([`crate::uid::decode`]).
pub fn set_uid(req: &mut RequestHeader, forward: &ForwardConfig, uid: &str) -> Result<()> {
    if let Some(name) = &forward.header {
        // insert_header replaces every existing value of the header. Bytes, not &str: a decoded
        // uid may be non-ASCII UTF-8, which `HeaderValue::from_str` refuses.
        req.insert_header(name.clone(), uid.as_bytes())?;
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

/// The path and query with every `param=` removed and `param=<uid>` appended, or `None` when the
/// query already carries exactly that (the common case of a client sending its own uid in the
/// query: no copy then).
pub fn rewrite_query(uri: &http::Uri, param: &str, uid: &str) -> Option<String> {
    let query = uri.query().unwrap_or("");
    let encoded = utf8_percent_encode(uid, QUERY_VALUE);
    let mut matches = query.split('&').filter(|p| key_of(p) == param);
    if let (Some(only), None) = (matches.next(), matches.next()) {
        if let Some(v) = only.strip_prefix(param).and_then(|r| r.strip_prefix('=')) {
            if encoded.clone().eq_str(v) {
                return None;
            }
        }
    }
    let mut out =
        String::with_capacity(uri.path().len() + query.len() + param.len() + uid.len() * 3 + 2);
    out.push_str(uri.path());
    out.push('?');
    for pair in query
        .split('&')
        .filter(|p| !p.is_empty() && key_of(p) != param)
    {
        out.push_str(pair);
        out.push('&');
    }
    let _ = write!(out, "{param}={encoded}");
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
/// `$proxy_add_x_forwarded_for`), `X-Real-IP` and `X-Forwarded-Proto`.
pub fn set_proxy_headers(
    req: &mut RequestHeader,
    client_ip: Option<std::net::IpAddr>,
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
    req.insert_header("x-forwarded-proto", "http")?;
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
    fn non_ascii_uid_is_forwarded_in_header_and_query() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        set_uid(&mut req, &ForwardConfig::default(), "zoë").unwrap();
        assert_eq!(req.headers["x-gopush-uid"].as_bytes(), "zoë".as_bytes());
        assert_eq!(req.uri.to_string(), "/?uid=zo%C3%AB");
    }

    #[test]
    fn proxy_headers_chain_xff() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "10.1.1.1").unwrap();
        set_proxy_headers(&mut req, Some("127.0.0.2".parse().unwrap())).unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "10.1.1.1, 127.0.0.2");
        assert_eq!(req.headers["x-real-ip"], "127.0.0.2");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
    }
}
