use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "a-test-secret-of-reasonable-length!";

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn source(yaml: &str) -> JwtVerifier {
    let s: JwtSource = serde_yaml::from_str(yaml).unwrap();
    s.verifier(&fixtures()).unwrap()
}

fn hs256() -> JwtVerifier {
    source(&format!(
        "{{from: query, name: token, key: \"{SECRET}\", alg: HS256}}"
    ))
}

fn sign_hs(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn sign_rs(claims: serde_json::Value) -> String {
    let pem = std::fs::read(fixtures().join("rsa-private.pem")).unwrap();
    encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

#[test]
fn valid_hs256_token_gives_the_sub_claim() {
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "alice", "exp": now() + 60}),
    );
    assert_eq!(hs256().verify(&t), Ok("alice".to_string()));
}

#[test]
fn other_claims_and_numeric_values() {
    let s = source(&format!(
        "{{from: cookie, name: jwt, key: \"{SECRET}\", alg: HS256, claim: uid}}"
    ));
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "x", "uid": 42, "exp": now() + 60}),
    );
    assert_eq!(s.verify(&t), Ok("42".to_string()));
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "x", "exp": now() + 60}),
    );
    assert_eq!(s.verify(&t), Err("the token has no usable uid claim"));
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused() {
    let s = hs256();
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "alice", "exp": now() - 3600}),
    );
    assert_eq!(s.verify(&t), Err("the token has expired"));
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "alice", "exp": now() + 7200, "nbf": now() + 3600}),
    );
    assert_eq!(s.verify(&t), Err("the token is not valid yet"));
    // No exp at all: refused, a token must expire.
    let t = sign_hs(Algorithm::HS256, SECRET, json!({"sub": "alice"}));
    assert_eq!(s.verify(&t), Err("the token lacks a required claim"));
}

#[test]
fn wrong_signature_and_garbage_are_refused_without_leaking() {
    let s = hs256();
    let t = sign_hs(
        Algorithm::HS256,
        "another-secret-entirely-different",
        json!({"sub": "alice", "exp": now() + 60}),
    );
    let why = s.verify(&t).unwrap_err();
    assert_eq!(why, "the token signature is wrong");
    assert!(!why.contains(SECRET));
    assert_eq!(s.verify("not.a.jwt"), Err("the token is malformed"));
    assert_eq!(s.verify("abc"), Err("the token is malformed"));
    // A tampered payload with the original signature.
    let good = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "alice", "exp": now() + 60}),
    );
    let evil = sign_hs(
        Algorithm::HS256,
        "x",
        json!({"sub": "mallory", "exp": now() + 60}),
    );
    let parts: Vec<&str> = good.split('.').collect();
    let evil_parts: Vec<&str> = evil.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], evil_parts[1], parts[2]);
    assert_eq!(s.verify(&forged), Err("the token signature is wrong"));
}

#[test]
fn a_token_of_another_algorithm_is_refused() {
    let s = hs256();
    let t = sign_hs(
        Algorithm::HS512,
        SECRET,
        json!({"sub": "alice", "exp": now() + 60}),
    );
    assert_eq!(s.verify(&t), Err("the token algorithm is not accepted"));
    // alg "none"
    let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let body = t.split('.').nth(1).unwrap();
    assert!(s.verify(&format!("{header}.{body}.")).is_err());
}

#[test]
fn rs256_valid_and_alg_confusion() {
    let s = source("{from: header, name: authorization, key_file: rsa-public.pem, alg: RS256}");
    let t = sign_rs(json!({"sub": "bob", "exp": now() + 60}));
    assert_eq!(s.verify(&t), Ok("bob".to_string()));
    // The classic confusion: an HS256 token whose HMAC secret is the RSA *public* key.
    let public = std::fs::read_to_string(fixtures().join("rsa-public.pem")).unwrap();
    let forged = sign_hs(
        Algorithm::HS256,
        &public,
        json!({"sub": "mallory", "exp": now() + 60}),
    );
    assert_eq!(
        s.verify(&forged),
        Err("the token algorithm is not accepted")
    );
}

#[test]
fn es256_tokens_verify() {
    let s = source("{from: header, name: x-token, key_file: ec-public.pem, alg: ES256}");
    let pem = std::fs::read(fixtures().join("ec-private.pem")).unwrap();
    let t = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "erin", "exp": now() + 60}),
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    assert_eq!(s.verify(&t), Ok("erin".to_string()));
}

#[test]
fn issuer_and_audience_when_configured() {
    let s = source(&format!(
        "{{from: query, name: t, key: \"{SECRET}\", alg: HS256, issuer: me, audience: chat}}"
    ));
    let ok = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "a", "exp": now() + 60, "iss": "me", "aud": "chat"}),
    );
    assert_eq!(s.verify(&ok), Ok("a".to_string()));
    let bad = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "a", "exp": now() + 60, "iss": "me", "aud": "other"}),
    );
    assert_eq!(s.verify(&bad), Err("the token audience is not accepted"));
    // Without an audience configured, a token carrying one is still accepted.
    let t = sign_hs(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "a", "exp": now() + 60, "aud": "x"}),
    );
    assert_eq!(hs256().verify(&t), Ok("a".to_string()));
}

#[test]
fn key_errors_name_the_field_and_hide_the_key() {
    let s: JwtSource =
        serde_yaml::from_str("{from: query, name: t, key: \"not a pem\", alg: RS256}").unwrap();
    let (field, msg) = s.verifier(&fixtures()).unwrap_err();
    assert_eq!(field, "key");
    assert!(msg.contains("RSA public key"), "{msg}");
    assert!(!msg.contains("not a pem"), "{msg}");
    let s: JwtSource =
        serde_yaml::from_str("{from: query, name: t, key_file: nope.pem, alg: RS256}").unwrap();
    let (field, msg) = s.verifier(&fixtures()).unwrap_err();
    assert_eq!(field, "key_file");
    assert!(msg.contains("nope.pem"), "{msg}");
    let s: JwtSource = serde_yaml::from_str("{from: query, name: t, alg: HS256}").unwrap();
    assert_eq!(s.verifier(&fixtures()).unwrap_err().0, "key");
    assert!(serde_yaml::from_str::<JwtSource>("{from: query, name: t, key: k, alg: XX1}").is_err());
    assert!(format!("{s:?}").contains("JwtSource"));
    let s: JwtSource =
        serde_yaml::from_str("{from: query, name: t, key: supersecret, alg: HS256}").unwrap();
    assert!(!format!("{s:?}").contains("supersecret"));
}

#[test]
fn tokens_are_found_in_cookie_query_and_bearer_header() {
    let req = |uri: &str, h: &[(&str, &str)]| {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (k, v) in h {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    };
    let q = hs256();
    assert_eq!(
        q.token(&req("/?a=1&token=x.y%2Ez", &[])).as_deref(),
        Some("x.y.z")
    );
    assert_eq!(q.token(&req("/?token=", &[])), None);
    let c = source(&format!(
        "{{from: cookie, name: jwt, key: \"{SECRET}\", alg: HS256}}"
    ));
    assert_eq!(
        c.token(&req("/", &[("cookie", "a=1; jwt=t.o.k")]))
            .as_deref(),
        Some("t.o.k")
    );
    let h = source(&format!(
        "{{from: header, name: Authorization, key: \"{SECRET}\", alg: HS256}}"
    ));
    assert_eq!(
        h.token(&req("/", &[("authorization", "Bearer  t.o.k")]))
            .as_deref(),
        Some("t.o.k")
    );
    assert_eq!(
        h.token(&req("/", &[("authorization", "t.o.k")])).as_deref(),
        Some("t.o.k")
    );
    assert_eq!(h.token(&req("/", &[])), None);
}
