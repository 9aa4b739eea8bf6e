//! The signed-token uid source: `{jwt: {from: query, name: token, key: ..., alg: HS256}}`.
//!
//! The token is verified with the `jsonwebtoken` crate against one configured key and one
//! algorithm (a token announcing any other algorithm is refused, which closes the classic
//! "HS256 token signed with the RSA public key" confusion). `exp` is required and checked, `nbf`
//! is checked when present. The uid is the configured claim (`sub` by default), and that claim
//! value is also the hash key. Refusal reasons are fixed words: they never echo key material or
//! the token.

use crate::uid::{cookie_in, query_value};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora::http::RequestHeader;
use serde::{de, Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the token travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFrom {
    /// A cookie.
    Cookie,
    /// A query parameter (the only choice for browser WebSocket upgrades).
    Query,
    /// A request header; a `Bearer ` prefix is removed.
    Header,
}

/// The `jwt` uid source as configured; [`JwtSource::verifier`] loads its key into a
/// [`JwtVerifier`], which the snapshot's uid resolver holds.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSource {
    /// Where the token is.
    pub from: TokenFrom,
    /// Cookie, query parameter or header name.
    pub name: String,
    /// The key itself: the shared secret for HS*, a PEM public key for RS*/PS*/ES*/EdDSA.
    /// Usually `${ENV_VAR}`.
    #[serde(default)]
    pub key: Option<String>,
    /// Or a file holding it (relative paths: from the configuration file's directory).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The one accepted algorithm.
    #[serde(deserialize_with = "algorithm")]
    pub alg: Algorithm,
    /// The claim holding the uid.
    #[serde(default = "default_claim")]
    pub claim: String,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set (otherwise tokens carrying an `aud` are accepted as they are).
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default, with = "humantime_serde")]
    pub leeway: Duration,
}

/// A [`JwtSource`] with its key loaded: what the request path verifies tokens with.
pub struct JwtVerifier {
    source: JwtSource,
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source's Debug redacts the key; the decoding key is not printed at all.
        f.debug_struct("JwtVerifier")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn default_claim() -> String {
    "sub".into()
}

fn algorithm<'de, D: Deserializer<'de>>(d: D) -> Result<Algorithm, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        de::Error::custom(format!(
            "`{s}` is not a JWT algorithm (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
        ))
    })
}

impl fmt::Debug for JwtSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key: configurations end up in logs and bug reports.
        f.debug_struct("JwtSource")
            .field("from", &self.from)
            .field("name", &self.name)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("key_file", &self.key_file)
            .field("alg", &self.alg)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl PartialEq for JwtSource {
    fn eq(&self, o: &Self) -> bool {
        self.from == o.from
            && self.name == o.name
            && self.key == o.key
            && self.key_file == o.key_file
            && self.alg == o.alg
            && self.claim == o.claim
            && self.issuer == o.issuer
            && self.audience == o.audience
            && self.leeway == o.leeway
    }
}

impl Eq for JwtSource {}

impl fmt::Display for JwtSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = match self.from {
            TokenFrom::Cookie => "cookie",
            TokenFrom::Query => "query",
            TokenFrom::Header => "header",
        };
        write!(f, "signed token in {from} `{}`", self.name)
    }
}

impl JwtSource {
    /// Reads the key (from `key` or `key_file`, relative to `base`) and prepares verification.
    /// Errors are `(key suffix, message)`, e.g. `("key_file", "cannot read ...")`, and never
    /// contain key material.
    pub fn verifier(&self, base: &Path) -> Result<JwtVerifier, (&'static str, String)> {
        if self.name.is_empty() {
            return Err(("name", "must not be empty".into()));
        }
        let material: Vec<u8> = match (&self.key, &self.key_file) {
            (Some(k), None) => k.as_bytes().to_vec(),
            (None, Some(file)) => {
                let path = base.join(file);
                let mut bytes = std::fs::read(&path)
                    .map_err(|e| ("key_file", format!("cannot read {}: {e}", path.display())))?;
                // A secret written with `echo` ends in a newline that is not part of it.
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                bytes
            }
            _ => return Err(("key", "set exactly one of `key` and `key_file`".into())),
        };
        let field = if self.key.is_some() {
            "key"
        } else {
            "key_file"
        };
        if material.is_empty() {
            return Err((field, "the key is empty".into()));
        }
        use jsonwebtoken::AlgorithmFamily as F;
        let family = self.alg.family();
        let key = match family {
            F::Hmac => Ok(DecodingKey::from_secret(&material)),
            F::Rsa => DecodingKey::from_rsa_pem(&material),
            F::Ec => DecodingKey::from_ec_pem(&material),
            F::Ed => DecodingKey::from_ed_pem(&material),
        }
        .map_err(|_| {
            let want = match family {
                F::Hmac => "a shared secret",
                F::Rsa => "an RSA public key in PEM format",
                F::Ec => "an EC public key in PEM format",
                F::Ed => "an Ed25519 public key in PEM format",
            };
            (field, format!("not {want} (as {:?} needs)", self.alg))
        })?;
        let mut validation = Validation::new(self.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(JwtVerifier {
            source: self.clone(),
            key,
            validation,
        })
    }

    /// The token in `req`, if any (empty counts as absent).
    pub fn token<'r>(&self, req: &'r RequestHeader) -> Option<Cow<'r, str>> {
        let raw: Cow<'r, str> = match self.from {
            TokenFrom::Cookie => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|h| cookie_in(h, &self.name))
                .map(Cow::Borrowed)?,
            TokenFrom::Query => {
                let v = query_value(req.uri.query()?, &self.name)?;
                percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .unwrap_or(Cow::Borrowed(v))
            }
            TokenFrom::Header => {
                let v = req.headers.get(self.name.as_str())?.to_str().ok()?.trim();
                let bearer = v
                    .get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
                Cow::Borrowed(if bearer { v[7..].trim_start() } else { v })
            }
        };
        (!raw.is_empty()).then_some(raw)
    }
}

impl JwtVerifier {
    /// The token in `req`, if any (see [`JwtSource::token`]).
    pub fn token<'r>(&self, req: &'r RequestHeader) -> Option<Cow<'r, str>> {
        self.source.token(req)
    }

    /// Verifies `token` and returns the uid claim, or a fixed reason for the refusal.
    pub fn verify(&self, token: &str) -> Result<String, &'static str> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| reason(e.kind()))?;
        match data.claims.get(&self.source.claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            _ => Err("the token has no usable uid claim"),
        }
    }
}

fn reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "the token has expired",
        K::ImmatureSignature => "the token is not valid yet",
        K::InvalidSignature => "the token signature is wrong",
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            "the token algorithm is not accepted"
        }
        K::MissingRequiredClaim(_) => "the token lacks a required claim",
        K::InvalidIssuer => "the token issuer is not accepted",
        K::InvalidAudience => "the token audience is not accepted",
        _ => "the token is malformed",
    }
}

#[cfg(test)]
mod tests;
