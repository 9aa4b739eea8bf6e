//! Who may use the admin API: the bearer token, the `admin(req)` hook, and the guard against
//! hostile pages in an operator's browser (cross-site requests, DNS rebinding).

use crate::config::AdminConfig;
use crate::live::Snapshot;
use http::Method;
use pingora::http::RequestHeader;
use subtle::ConstantTimeEq;

/// Decides whether an admin request may proceed: the one place for authentication.
///
/// When `admin.token` is set, the request must carry `Authorization: Bearer TOKEN` (compared in
/// constant time). When the `admin(req)` JavaScript hook is configured, it is asked next and only
/// `true` admits (a failing hook denies). With neither (allowed on a loopback listener only, see
/// config validation) every request passes.
pub(super) fn authorize(
    snap: &Snapshot,
    req: &RequestHeader,
    peer: Option<std::net::IpAddr>,
) -> bool {
    if !token_ok(req, &snap.config.admin) {
        return false;
    }
    match snap.admin_allowed(req, peer) {
        Ok(None) => true,
        Ok(Some(allowed)) => allowed,
        Err(e) => {
            tracing::warn!("admin hook failed, request denied: {e}");
            false
        }
    }
}

/// The token part of [`authorize`]: passes when no token is set.
fn token_ok(req: &RequestHeader, admin: &AdminConfig) -> bool {
    let Some(token) = admin.token() else {
        return true;
    };
    let Some(given) = bearer(req) else {
        return false;
    };
    // Constant time over the bytes; only the length can leak, as with any such comparison.
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Refuses what only a hostile web page in an operator's browser would send.
///
/// - A state-changing request whose `Origin` is not this listener (cross-site request forgery:
///   browsers send `Origin` on every `POST`, curl and scripts do not; a request without one is
///   not from a page of another site).
/// - Unless a **token** is configured (`has_token`), a `Host` that is a name other than
///   `localhost`: a DNS-rebinding page reaches the listener under its own name (its
///   `evil.example` now resolves to 127.0.0.1), so the browser sends `Host: evil.example:PORT`
///   and treats the answers as its own. A literal IP address or `localhost` in `Host` cannot
///   come from such a page. An `admin(req)` hook does not lift this check: everything it can
///   look at (`req.ip` is 127.0.0.1 for a rebound browser on the same machine, headers,
///   cookies of the rebound name) is what the attacker's page sends; a token is a secret it
///   does not have (the admin page keeps it in its own origin's `sessionStorage`, no cookie).
pub(super) fn browser_guard(
    req: &RequestHeader,
    method: &Method,
    has_token: bool,
) -> Option<String> {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !has_token && !is_address_host(host) {
        return Some(format!(
            "Host `{host}` is not an IP address or localhost (DNS rebinding): without admin.token only those are served; set admin.token to reach the admin listener by name"
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        if let Some(origin) = req.headers.get(http::header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| {
                    o.strip_prefix("http://")
                        .or_else(|| o.strip_prefix("https://"))
                })
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !same {
                return Some("cross-origin request refused (Origin does not match Host)".into());
            }
        }
    }
    None
}

/// `127.0.0.1:6004`, `[::1]:6004`, `10.0.0.5:6004`, `localhost:6004` (port optional): a `Host`
/// that is a literal address or `localhost`, never a name that DNS (an attacker's) resolves.
fn is_address_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || (host.starts_with('[') && name.parse::<std::net::Ipv6Addr>().is_ok())
        || (!host.starts_with('[') && name.parse::<std::net::Ipv4Addr>().is_ok())
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(req: &RequestHeader) -> Option<&str> {
    let value = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn admin(token: Option<&str>) -> AdminConfig {
        let yaml = match token {
            Some(t) => format!("token: \"{t}\""),
            None => "{}".into(),
        };
        let mut a: AdminConfig = serde_yaml::from_str(&yaml).unwrap();
        if token.is_none() {
            a.token = None::<Secret>;
        }
        a
    }

    fn req(auth: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/api/status", None).unwrap();
        if let Some(a) = auth {
            r.insert_header("authorization", a).unwrap();
        }
        r
    }

    #[test]
    fn bearer_token_is_required_when_configured() {
        let a = admin(Some("s3cret"));
        assert!(!token_ok(&req(None), &a));
        assert!(!token_ok(&req(Some("Bearer nope")), &a));
        assert!(!token_ok(&req(Some("Bearer s3cre")), &a));
        assert!(!token_ok(&req(Some("Basic s3cret")), &a));
        assert!(token_ok(&req(Some("Bearer s3cret")), &a));
        assert!(token_ok(&req(Some("bearer  s3cret ")), &a));
    }

    #[test]
    fn no_token_means_open_and_empty_token_is_no_token() {
        assert!(token_ok(&req(None), &admin(None)));
        assert!(token_ok(&req(None), &admin(Some(""))));
    }

    #[test]
    fn browsers_from_elsewhere_are_refused() {
        let build = |method: &str, host: &str, origin: Option<&str>| {
            let mut r = RequestHeader::build(method, b"/api/push", None).unwrap();
            r.insert_header("host", host).unwrap();
            if let Some(o) = origin {
                r.insert_header("origin", o).unwrap();
            }
            r
        };
        let open = false; // no token (an admin hook or nothing)
        let locked = true; // admin.token
        let post = Method::POST;
        // Same origin (the page) and no Origin (curl) pass.
        let page = build("POST", "127.0.0.1:6004", Some("http://127.0.0.1:6004"));
        assert!(browser_guard(&page, &post, open).is_none());
        assert!(browser_guard(&build("POST", "localhost:6004", None), &post, open).is_none());
        assert!(browser_guard(&build("POST", "[::1]:6004", None), &post, open).is_none());
        // Another site's page posting here.
        let csrf = build("POST", "127.0.0.1:6004", Some("http://evil.example"));
        assert!(browser_guard(&csrf, &post, open).is_some());
        assert!(browser_guard(&csrf, &post, locked).is_some());
        // DNS rebinding without a token (with or without an admin hook); with a token the
        // name does not matter.
        let rebound = build("GET", "evil.example:6004", None);
        assert!(browser_guard(&rebound, &Method::GET, open).is_some());
        assert!(browser_guard(&rebound, &Method::GET, locked).is_none());
        let rebound_post = build(
            "POST",
            "evil.example:6004",
            Some("http://evil.example:6004"),
        );
        assert!(browser_guard(&rebound_post, &post, open).is_some());
        assert!(browser_guard(&rebound_post, &post, locked).is_none());
        // Names that only look like addresses are names.
        for host in [
            "127.0.0.1.evil.example",
            "[::1].evil.example",
            "0x7f.1",
            "",
            "[::1",
        ] {
            assert!(
                browser_guard(&build("GET", host, None), &Method::GET, open).is_some(),
                "{host:?}"
            );
        }
        // Literal addresses (a non-loopback listener reached by IP) and localhost pass.
        for host in [
            "10.0.0.5:6004",
            "[fd00::5]:6004",
            "127.0.0.1",
            "LOCALHOST:6004",
        ] {
            assert!(
                browser_guard(&build("GET", host, None), &Method::GET, open).is_none(),
                "{host:?}"
            );
        }
        // The page behind a TLS-terminating proxy is same-origin too.
        let tls = build("POST", "admin.example", Some("https://admin.example"));
        assert!(browser_guard(&tls, &post, locked).is_none());
        let other = build("POST", "admin.example", Some("https://admin.example.evil"));
        assert!(browser_guard(&other, &post, locked).is_some());
    }
}
