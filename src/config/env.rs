//! `${VAR}` substitution, so that secrets live in the environment rather than in the file.
//!
//! Only the braced form is recognised (`$` alone is left alone: passwords contain it), with an
//! optional default: `${VAR:-fallback}`.
//!
//! Substitution happens *after* YAML parsing, inside scalar values only: [`Expand`] wraps the
//! YAML deserializer and rewrites each string scalar as it is read. So a value can never become
//! YAML syntax: quotes, newlines, `#`, `:` or `[` in a variable land verbatim in the one scalar
//! that referenced it, and cannot add keys or move the document's structure. Comments are never
//! expanded (the parser drops them), and mapping keys are not either (only values). Errors keep
//! their file, line, column and key path, because the wrapped parser still reports them.
//!
//! A scalar that referenced a variable and is read as a number or a boolean (`threads: ${N}`)
//! is resolved after substitution like a plain YAML scalar of that type (`8080`, `true`); if it
//! does not look like one, the field's own error names it.

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use std::fmt;

/// How a variable is looked up (the process environment, or a map in tests).
pub type Lookup = dyn Fn(&str) -> Option<String>;

/// Replaces every `${NAME}` / `${NAME:-default}` in one scalar `value` using `lookup`.
/// `Ok(None)` when the value references nothing (and stays as it is).
pub fn substitute(value: &str, lookup: &Lookup) -> Result<Option<String>, String> {
    if !value.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${`".to_string())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(format!("`${{{inner}}}` is not a valid variable reference"));
        }
        match lookup(name).or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

/// A deserializer that substitutes `${VAR}` in the string scalars (values, not keys) that `D`
/// produces. Everything else passes through unchanged.
pub struct Expand<'a, D> {
    de: D,
    env: &'a Lookup,
}

impl<'a, D> Expand<'a, D> {
    /// Wraps `de`.
    pub fn new(de: D, env: &'a Lookup) -> Self {
        Expand { de, env }
    }
}

/// What the field asked for, so that a substituted scalar resolves like a plain one.
#[derive(Clone, Copy)]
enum Want {
    Bool,
    Int,
    Float,
    Other,
}

/// The visitor wrapper.
struct V<'a, X> {
    inner: X,
    env: &'a Lookup,
    want: Want,
}

impl<'a, X> V<'a, X> {
    fn new(inner: X, env: &'a Lookup, want: Want) -> Self {
        V { inner, env, want }
    }
}

/// A substituted scalar resolved for `want`: `true`/`false` for a boolean, digits for a number,
/// else the string itself (which the field then accepts or names in its error).
fn resolved<'de, X: Visitor<'de>, E: de::Error>(
    inner: X,
    want: Want,
    s: String,
) -> Result<X::Value, E> {
    match want {
        Want::Bool => match s.as_str() {
            "true" => inner.visit_bool(true),
            "false" => inner.visit_bool(false),
            _ => inner.visit_string(s),
        },
        Want::Int | Want::Float => {
            if let Ok(n) = s.parse::<u64>() {
                inner.visit_u64(n)
            } else if let Ok(n) = s.parse::<i64>() {
                inner.visit_i64(n)
            } else if matches!(want, Want::Float)
                && !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            {
                match s.parse::<f64>() {
                    Ok(f) => inner.visit_f64(f),
                    Err(_) => inner.visit_string(s),
                }
            } else {
                inner.visit_string(s)
            }
        }
        Want::Other => inner.visit_string(s),
    }
}

macro_rules! via_any {
    ($($method:ident => $want:expr),* $(,)?) => {$(
        fn $method<X: Visitor<'de>>(self, visitor: X) -> Result<X::Value, Self::Error> {
            // The YAML deserializer's typed methods refuse a string scalar without asking the
            // visitor; through `deserialize_any` a substituted `${PORT}` reaches it.
            self.de.deserialize_any(V::new(visitor, self.env, $want))
        }
    )*};
}

macro_rules! forward {
    ($($method:ident),* $(,)?) => {$(
        fn $method<X: Visitor<'de>>(self, visitor: X) -> Result<X::Value, Self::Error> {
            self.de.$method(V::new(visitor, self.env, Want::Other))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Expand<'_, D> {
    type Error = D::Error;

    via_any! {
        deserialize_bool => Want::Bool,
        deserialize_i8 => Want::Int,
        deserialize_i16 => Want::Int,
        deserialize_i32 => Want::Int,
        deserialize_i64 => Want::Int,
        deserialize_i128 => Want::Int,
        deserialize_u8 => Want::Int,
        deserialize_u16 => Want::Int,
        deserialize_u32 => Want::Int,
        deserialize_u64 => Want::Int,
        deserialize_u128 => Want::Int,
        deserialize_f32 => Want::Float,
        deserialize_f64 => Want::Float,
    }

    forward! {
        deserialize_any,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
    }

    fn deserialize_ignored_any<X: Visitor<'de>>(self, visitor: X) -> Result<X::Value, D::Error> {
        // Ignored values are not looked at, so they need no variables.
        self.de.deserialize_ignored_any(visitor)
    }

    fn deserialize_unit_struct<X: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_unit_struct(name, V::new(visitor, self.env, Want::Other))
    }

    fn deserialize_newtype_struct<X: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_newtype_struct(name, V::new(visitor, self.env, Want::Other))
    }

    fn deserialize_tuple<X: Visitor<'de>>(
        self,
        len: usize,
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_tuple(len, V::new(visitor, self.env, Want::Other))
    }

    fn deserialize_tuple_struct<X: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_tuple_struct(name, len, V::new(visitor, self.env, Want::Other))
    }

    fn deserialize_struct<X: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_struct(name, fields, V::new(visitor, self.env, Want::Other))
    }

    fn deserialize_enum<X: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: X,
    ) -> Result<X::Value, D::Error> {
        self.de
            .deserialize_enum(name, variants, V::new(visitor, self.env, Want::Other))
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

macro_rules! pass {
    ($($method:ident: $ty:ty),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<X::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, X: Visitor<'de>> Visitor<'de> for V<'_, X> {
    type Value = X::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    pass! {
        visit_bool: bool,
        visit_i8: i8,
        visit_i16: i16,
        visit_i32: i32,
        visit_i64: i64,
        visit_i128: i128,
        visit_u8: u8,
        visit_u16: u16,
        visit_u32: u32,
        visit_u64: u64,
        visit_u128: u128,
        visit_f32: f32,
        visit_f64: f64,
        visit_char: char,
        visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>,
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<X::Value, E> {
        match substitute(v, self.env).map_err(E::custom)? {
            None => self.inner.visit_str(v),
            Some(s) => resolved(self.inner, self.want, s),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<X::Value, E> {
        match substitute(v, self.env).map_err(E::custom)? {
            None => self.inner.visit_borrowed_str(v),
            Some(s) => resolved(self.inner, self.want, s),
        }
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<X::Value, E> {
        match substitute(&v, self.env).map_err(E::custom)? {
            None => self.inner.visit_string(v),
            Some(s) => resolved(self.inner, self.want, s),
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<X::Value, E> {
        self.inner.visit_none()
    }

    fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<X::Value, D2::Error> {
        self.inner.visit_some(Expand::new(d, self.env))
    }

    fn visit_unit<E: de::Error>(self) -> Result<X::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_newtype_struct<D2: Deserializer<'de>>(self, d: D2) -> Result<X::Value, D2::Error> {
        self.inner.visit_newtype_struct(Expand::new(d, self.env))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<X::Value, A::Error> {
        self.inner.visit_seq(Seq {
            inner: seq,
            env: self.env,
        })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<X::Value, A::Error> {
        self.inner.visit_map(Map {
            inner: map,
            env: self.env,
        })
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<X::Value, A::Error> {
        self.inner.visit_enum(Enum {
            inner: data,
            env: self.env,
        })
    }
}

/// A seed whose deserializer substitutes.
struct Seed<'a, S> {
    inner: S,
    env: &'a Lookup,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;
    fn deserialize<D2: Deserializer<'de>>(self, d: D2) -> Result<S::Value, D2::Error> {
        self.inner.deserialize(Expand::new(d, self.env))
    }
}

struct Seq<'a, A> {
    inner: A,
    env: &'a Lookup,
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Seq<'_, A> {
    type Error = A::Error;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        self.inner.next_element_seed(Seed {
            inner: seed,
            env: self.env,
        })
    }
    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct Map<'a, A> {
    inner: A,
    env: &'a Lookup,
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Map<'_, A> {
    type Error = A::Error;
    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        // Keys are names, not values: never substituted.
        self.inner.next_key_seed(seed)
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.next_value_seed(Seed {
            inner: seed,
            env: self.env,
        })
    }
    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct Enum<'a, A> {
    inner: A,
    env: &'a Lookup,
}

impl<'a, 'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Enum<'a, A> {
    type Error = A::Error;
    type Variant = Variant<'a, A::Variant>;
    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        // A scalar enum (`format: ${LOG_FORMAT}`) names its variant with a value.
        let (value, variant) = self.inner.variant_seed(Seed {
            inner: seed,
            env: self.env,
        })?;
        Ok((
            value,
            Variant {
                inner: variant,
                env: self.env,
            },
        ))
    }
}

struct Variant<'a, A> {
    inner: A,
    env: &'a Lookup,
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Variant<'_, A> {
    type Error = A::Error;
    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.newtype_variant_seed(Seed {
            inner: seed,
            env: self.env,
        })
    }
    fn tuple_variant<X: Visitor<'de>>(self, len: usize, visitor: X) -> Result<X::Value, A::Error> {
        self.inner
            .tuple_variant(len, V::new(visitor, self.env, Want::Other))
    }
    fn struct_variant<X: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: X,
    ) -> Result<X::Value, A::Error> {
        self.inner
            .struct_variant(fields, V::new(visitor, self.env, Want::Other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IntoDeserializer;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cr$t".to_string())
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        let out = substitute("${TOKEN}/${NOPE:-x}/$HOME", &env).unwrap();
        assert_eq!(out.as_deref(), Some("s3cr$t/x/$HOME"));
        assert_eq!(substitute("$HOME", &env).unwrap(), None);
    }

    #[test]
    fn unset_variable_is_named() {
        let e = substitute("${MISSING}", &env).unwrap_err();
        assert!(e.contains("MISSING"), "{e}");
    }

    #[test]
    fn rejects_malformed_references() {
        assert!(substitute("${1X}", &env).is_err());
        assert!(substitute("${TOKEN", &env).is_err());
        assert!(substitute("${}", &env).is_err());
    }

    #[test]
    fn string_scalars_are_substituted_through_a_plain_deserializer() {
        use serde::Deserialize;
        let d: de::value::StrDeserializer<'_, de::value::Error> = "${TOKEN}".into_deserializer();
        let s = String::deserialize(Expand::new(d, &env)).unwrap();
        assert_eq!(s, "s3cr$t");
    }
}
