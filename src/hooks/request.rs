//! The `req` object a hook receives: a plain, frozen snapshot of the request head.
//!
//! Built only when a hook runs, straight from the Pingora request head: `method`, `path`, `url`
//! (path and query as sent), `query` and `cookies` (decoded like Express / `URLSearchParams`
//! would, the first value of a repeated name wins), `headers` (lower-case names, repeated headers
//! joined with `, `, cookies with `; ` as Node does), `ip` (after trusted `X-Forwarded-For`) and
//! `product` (the pool-selecting query parameter, as sent). Maps have no prototype, so a name such
//! as `__proto__` is an ordinary key.

use percent_encoding::percent_decode_str;
use pingora::http::RequestHeader;
use rquickjs::{Ctx, Function, Object};
use std::borrow::Cow;
use std::net::IpAddr;

/// What a hook may know about a request.
#[derive(Debug, Clone, Copy)]
pub struct HookRequest<'a> {
    /// The request head as received.
    pub header: &'a RequestHeader,
    /// The client address (see [`crate::client_ip`]).
    pub ip: Option<IpAddr>,
    /// The product query parameter, as sent.
    pub product: Option<&'a str>,
}

/// `+` is a space, then percent-decoding; invalid UTF-8 is replaced rather than refused.
pub fn form_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['+', '%']) {
        return Cow::Borrowed(s);
    }
    let spaced: Cow<'_, str> = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    let decoded = percent_decode_str(&spaced).decode_utf8_lossy().into_owned();
    Cow::Owned(decoded)
}

/// Decoded query pairs in order (empty pieces skipped).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k), form_decode(v))
    })
}

/// Cookie pairs of every `Cookie` header in order, values percent-decoded.
pub fn cookie_pairs(req: &RequestHeader) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let name = name.trim();
            let mut value = value.trim();
            if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                value = &value[1..value.len() - 1];
            }
            (!name.is_empty()).then(|| (name, percent_decode_str(value).decode_utf8_lossy()))
        })
}

/// A map object without prototype, filled with first-wins semantics.
fn map<'js, K: AsRef<str>, V: AsRef<str>>(
    ctx: &Ctx<'js>,
    pairs: impl Iterator<Item = (K, V)>,
) -> rquickjs::Result<Object<'js>> {
    let o = Object::new(ctx.clone())?;
    o.set_prototype(None)?;
    // First wins. Deduplicated here rather than by asking the object: a request has a handful
    // of names, and every JS property lookup costs an atom.
    let mut seen: Vec<K> = Vec::new();
    for (k, v) in pairs {
        if seen.iter().any(|s| s.as_ref() == k.as_ref()) {
            continue;
        }
        o.set(k.as_ref(), v.as_ref())?;
        seen.push(k);
    }
    Ok(o)
}

impl HookRequest<'_> {
    /// The frozen JS object for this request. `freeze` is the engine's own `Object.freeze`,
    /// taken before any hook code ran.
    pub fn to_js<'js>(
        &self,
        ctx: &Ctx<'js>,
        freeze: &Function<'js>,
    ) -> rquickjs::Result<Object<'js>> {
        let req = self.header;
        let o = Object::new(ctx.clone())?;
        o.set("method", req.method.as_str())?;
        o.set("path", req.uri.path())?;
        o.set(
            "url",
            req.uri
                .path_and_query()
                .map_or_else(|| req.uri.path(), |pq| pq.as_str()),
        )?;

        let query = map(ctx, query_pairs(req.uri.query().unwrap_or("")))?;
        let cookies = map(ctx, cookie_pairs(req))?;
        let headers = Object::new(ctx.clone())?;
        headers.set_prototype(None)?;
        for name in req.headers.keys() {
            let sep = if name == http::header::COOKIE {
                "; "
            } else {
                ", "
            };
            let mut joined: Option<Cow<'_, str>> = None;
            for v in req.headers.get_all(name) {
                let v = String::from_utf8_lossy(v.as_bytes());
                joined = Some(match joined {
                    None => v,
                    Some(prev) => Cow::Owned(format!("{prev}{sep}{v}")),
                });
            }
            headers.set(name.as_str(), joined.as_deref().unwrap_or(""))?;
        }
        for m in [&query, &cookies, &headers] {
            freeze.call::<_, ()>((m.clone(),))?;
        }
        o.set("query", query)?;
        o.set("cookies", cookies)?;
        o.set("headers", headers)?;
        let null = || rquickjs::Value::new_null(ctx.clone());
        match self.ip {
            Some(ip) => o.set("ip", ip.to_string())?,
            None => o.set("ip", null())?,
        }
        match self.product {
            Some(p) => o.set("product", p)?,
            None => o.set("product", null())?,
        }
        freeze.call::<_, ()>((o.clone(),))?;
        Ok(o)
    }
}
