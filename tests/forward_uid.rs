//! The backend's view of the forwarded uid (`gopush::forward::set_uid`), whatever the client
//! sent: exactly one query parameter whose *decoded* name is the forward name, equal to the
//! resolved uid, for the query parsers backends use (WHATWG `URLSearchParams` / Node /
//! Socket.IO, Go `url.ParseQuery`, Express `qs`, `;`-splitting Python < 3.9.2), and exactly one
//! forward header, `decodeURIComponent`-able to the uid, with no `_` look-alike beside it.

use gopush::config::ForwardConfig;
use gopush::forward::set_uid;
use percent_encoding::percent_decode_str;
use pingora::http::RequestHeader;
use proptest::prelude::*;

const NAME: &str = "uid";
const HEADER: &str = "x-gopush-uid";

// ---------------------------------------------------------------------------------------------
// How backends decode a query

fn form_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// WHATWG / Node `URLSearchParams` (and `form_urlencoded`): `&` only, lossy.
fn whatwg(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Python < 3.9.2 `parse_qsl`: `&` and `;` separate pairs.
fn semicolon_splitting(query: &str) -> Vec<(String, String)> {
    query
        .split(['&', ';'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// Strict percent-decoding (`+` as space first): `None` on an invalid escape.
fn strict_bytes(s: &str) -> Option<Vec<u8>> {
    let b = s.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Go `url.ParseQuery`: `&` only, a pair with `;` or an invalid escape is dropped, bytes kept.
fn go(query: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty() && !p.contains(';'))
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((strict_bytes(k)?, strict_bytes(v)?))
        })
        .collect()
}

/// Express `qs` (extended parser): the top-level name a pair lands under. `%5B`/`%5D` become
/// brackets, the key is `decodeURIComponent`ed (raw on failure), then `a[b]...` is filed under
/// `a` (the part before the first `[...]` group without nested brackets).
fn qs_parent(pair: &str) -> String {
    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
    let key = key
        .replace("%5B", "[")
        .replace("%5b", "[")
        .replace("%5D", "]")
        .replace("%5d", "]");
    let key = strict_bytes(&key)
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| key.replace('+', " "));
    let bytes = key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'[' {
            if let Some(len) = bytes[i + 1..].iter().position(|&c| c == b'[' || c == b']') {
                if bytes[i + 1 + len] == b']' {
                    return key[..i].to_string();
                }
            }
        }
        i += 1;
    }
    key
}

fn is_forward(name: &str) -> bool {
    name == NAME || name.starts_with("uid[")
}

// ---------------------------------------------------------------------------------------------
// The check

fn run(query: &str, headers: &[(&str, &str)], uid: &str) -> Result<(), TestCaseError> {
    let target = format!("/socket.io/?{query}");
    let Ok(mut req) = RequestHeader::build("GET", target.as_bytes(), None) else {
        return Err(TestCaseError::reject("not a request target"));
    };
    for (k, v) in headers {
        req.append_header(k.to_string(), *v)
            .map_err(|e| TestCaseError::fail(format!("append {k}: {e}")))?;
    }
    set_uid(&mut req, &ForwardConfig::default(), uid)
        .map_err(|e| TestCaseError::fail(format!("set_uid: {e}")))?;
    let out = req.uri.query().unwrap_or("").to_string();
    let ctx = format!("query {query:?} uid {uid:?} -> {out:?}");

    // WHATWG / Node / Socket.IO: exactly one `uid`, the uid; no bracket variant.
    let after = whatwg(&out);
    let uids: Vec<_> = after.iter().filter(|(k, _)| is_forward(k)).collect();
    prop_assert_eq!(uids.len(), 1, "WHATWG view: {}", ctx);
    prop_assert_eq!(&uids[0].0, NAME, "{}", ctx);
    prop_assert_eq!(&uids[0].1, uid, "{}", ctx);
    // everything else is kept, in order, with the same decoded name and value
    let before: Vec<_> = whatwg(query)
        .into_iter()
        .filter(|(k, _)| !is_forward(k))
        .collect();
    let kept: Vec<_> = after.into_iter().filter(|(k, _)| !is_forward(k)).collect();
    prop_assert_eq!(before, kept, "other parameters: {}", ctx);

    // `;`-splitting parsers
    let semi: Vec<_> = semicolon_splitting(&out)
        .into_iter()
        .filter(|(k, _)| is_forward(k))
        .collect();
    prop_assert_eq!(
        semi,
        vec![(NAME.to_string(), uid.to_string())],
        "; view: {}",
        ctx
    );

    // Go
    let go_uids: Vec<_> = go(&out)
        .into_iter()
        .filter(|(k, _)| k == NAME.as_bytes())
        .map(|(_, v)| v)
        .collect();
    prop_assert_eq!(go_uids, vec![uid.as_bytes().to_vec()], "Go view: {}", ctx);

    // qs
    let qs = out
        .split('&')
        .filter(|p| !p.is_empty() && qs_parent(p) == NAME)
        .count();
    prop_assert_eq!(qs, 1, "qs view: {}", ctx);

    // header: one, decodeURIComponent gives the uid, printable ASCII, no `_` look-alike
    let all: Vec<_> = req.headers.get_all(HEADER).iter().collect();
    prop_assert_eq!(all.len(), 1, "{}", ctx);
    let raw = all[0].as_bytes();
    prop_assert!(raw.iter().all(|b| (0x21..=0x7e).contains(b)), "{:?}", raw);
    let text = std::str::from_utf8(raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let decoded = percent_decode_str(text).decode_utf8().ok();
    prop_assert_eq!(decoded.as_deref(), Some(uid), "header {:?}: {}", text, ctx);
    for k in req.headers.keys() {
        let folded = k.as_str().replace('_', "-");
        prop_assert!(
            k.as_str() == HEADER || folded != HEADER,
            "header {} left",
            k
        );
    }
    let mut wire = Vec::new();
    req.header_to_h1_wire(&mut wire);
    let wire = String::from_utf8_lossy(&wire).to_ascii_lowercase();
    prop_assert_eq!(wire.matches("x-gopush-uid:").count(), 1, "{}", wire);
    prop_assert!(!wire.contains("x_gopush"), "{}", wire);
    Ok(())
}

fn check(query: &str, headers: &[(&str, &str)], uid: &str) {
    if let Err(e) = run(query, headers, uid) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-picked attacks (issue 11, item 1 and 7)

#[test]
fn encoded_uid_name_is_not_forwarded_when_the_query_already_holds_the_uid() {
    // (a): `uid=alice` is already there, so the query used to go through untouched and
    // Socket.IO (last value wins) read `victim`.
    for q in [
        "token=T&uid=alice&u%69d=victim",
        "token=T&uid=alice&%75id=victim",
        "token=T&uid=alice&%75%69%64=victim",
        "token=T&uid=alice&ui%64=victim",
        "token=T&uid=alice&uid%5B%5D=victim",
        "token=T&uid=alice&uid[]=victim",
        "token=T&uid=alice&uid[0]=victim",
        "token=T&uid=alice&x=1;uid=victim",
    ] {
        check(q, &[], "alice");
    }
}

#[test]
fn encoded_uid_name_before_the_appended_uid_is_removed() {
    // (b): first-value parsers read an earlier `u%69d=victim`.
    for q in [
        "token=T&u%69d=victim",
        "u%69d=victim&token=T",
        "%75id=victim",
        "%75%69%64=victim&%75%69%64=victim2",
        "ui%64=victim",
        "uid%5b0%5d=victim",
        "uid[x]=victim",
        "a=1;uid=victim",
        "uid=victim;a=1",
    ] {
        check(q, &[], "alice");
    }
}

#[test]
fn decoded_name_rules() {
    // rewritten: an exact copy of the uid as well
    for (q, expect) in [
        ("uid=alice&u%69d=alice", "/socket.io/?uid=alice"),
        ("a=1;uid=x&uid=alice", "/socket.io/?a=1%3Buid=x&uid=alice"),
        ("uid%5B%5D=x&b=2", "/socket.io/?b=2&uid=alice"),
        (
            "ui+d=x&uid+=y&uid=alice",
            "/socket.io/?ui+d=x&uid+=y&uid=alice",
        ),
    ] {
        let mut req = RequestHeader::build("GET", format!("/socket.io/?{q}").as_bytes(), None)
            .expect("request");
        set_uid(&mut req, &ForwardConfig::default(), "alice").expect("set_uid");
        assert_eq!(req.uri.to_string(), expect, "{q}");
    }
    // names that do not decode to `uid` are kept: case differs, `+` is a space, invalid UTF-8
    // becomes U+FFFD, `uid.x` (qs allowDots is off)
    for q in [
        "UID=x", "u+id=x", "uid%ff=x", "%ffuid=x", "uid.x=y", "u%=x", "uid2=x",
    ] {
        let mut req =
            RequestHeader::build("GET", format!("/p?{q}").as_bytes(), None).expect("request");
        set_uid(&mut req, &ForwardConfig::default(), "alice").expect("set_uid");
        assert_eq!(req.uri.to_string(), format!("/p?{q}&uid=alice"));
        check(q, &[], "alice");
    }
    // the fast path: exactly one canonical pair
    let mut req = RequestHeader::build("GET", b"/p?a=1&uid=al%C3%A9&b=2", None).expect("request");
    set_uid(&mut req, &ForwardConfig::default(), "alé").expect("set_uid");
    assert_eq!(req.uri.to_string(), "/p?a=1&uid=al%C3%A9&b=2");
}

#[test]
fn underscore_header_is_removed() {
    check(
        "uid=alice",
        &[
            ("x_gopush_uid", "victim"),
            ("X_Gopush_Uid", "victim2"),
            ("x-gopush_uid", "victim3"),
            ("x-gopush-uid", "victim4"),
        ],
        "alice",
    );
}

#[test]
fn non_ascii_uid_header_is_percent_encoded_utf8() {
    let mut req = RequestHeader::build("GET", b"/", None).expect("request");
    set_uid(&mut req, &ForwardConfig::default(), "zoé 50%").expect("set_uid");
    assert_eq!(req.headers[HEADER].as_bytes(), b"zo%C3%A9%2050%25");
    assert_eq!(req.uri.to_string(), "/?uid=zo%C3%A9%2050%25");
    // an ASCII uid without `%` or space is unchanged
    let mut req = RequestHeader::build("GET", b"/", None).expect("request");
    set_uid(&mut req, &ForwardConfig::default(), "a+b/c;d=e&f").expect("set_uid");
    assert_eq!(req.headers[HEADER].as_bytes(), b"a+b/c;d=e&f");
    assert_eq!(req.uri.to_string(), "/?uid=a%2Bb/c%3Bd%3De%26f");
    check("", &[], "é");
    check("uid=%C3%A9", &[], "é");
}

// ---------------------------------------------------------------------------------------------
// Property

fn uid_name() -> impl Strategy<Value = String> {
    let letter = |c: &'static str, enc: &'static str| prop::sample::select(vec![c, c, enc]);
    (
        letter("u", "%75"),
        letter("i", "%69"),
        letter("d", "%64"),
        prop::sample::select(vec![
            "", "", "", "[]", "[0]", "%5B%5D", "%5b0%5d", "[x", "]", "+", "%20", ".x", "%ff",
        ]),
    )
        .prop_map(|(u, i, d, tail)| format!("{u}{i}{d}{tail}"))
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => uid_name(),
        4 => prop::sample::select(vec![
            "a", "b", "token", "T", "victim", "alice", "uid", "UID", "=", "&", ";", "+", "%20",
            "%", "%f", "%ff", "%FF", "%zz", "%C3%A9", "%c3%a9", "é", "[", "]", "%5B", "%5D",
            "[]", "%3B", "%26", "%3D", "%2B", "%25", "?", "~", "%00", "%75", "%69", "%64",
            "u", "i", "d",
        ])
        .prop_map(String::from),
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..12).prop_map(|t| t.concat())
}

fn uid() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(
            prop::sample::select(vec![
                "a", "alice", "é", "ü", "日", "%", "%41", "&", "=", "+", " ", ";", "#", "/", "?",
                "[", "]", "uid", "\u{1}", "\u{7f}", "\"", "<",
            ]),
            1..6
        )
        .prop_map(|v| v.concat()),
        "\\PC{1,8}",
    ]
}

fn headers() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                "x-gopush-uid",
                "x_gopush_uid",
                "X_GOPUSH_UID",
                "x-gopush_uid",
                "x_gopush-uid",
                "x-gopush-uid2",
                "x-other",
            ]),
            prop::sample::select(vec!["victim", "alice", ""]),
        ),
        0..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn backend_sees_exactly_the_resolved_uid(q in query(), h in headers(), u in uid()) {
        run(&q, &h, &u)?;
    }
}
