//! `${VAR}` substitution, so that secrets live in the environment rather than in the file.
//!
//! Only the braced form is recognised (`$` alone is left alone: passwords contain it), with an
//! optional default: `${VAR:-fallback}`. It runs on the raw text before YAML parsing so that
//! errors keep their line numbers; a value that may contain YAML syntax should be quoted.

/// A reference that could not be substituted.
#[derive(Debug)]
pub struct EnvError {
    /// 1-based line of the reference.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Replaces every `${NAME}` / `${NAME:-default}` in `text` using `lookup`.
pub fn substitute(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    if !text.contains("${") {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let line = text[..text.len() - rest.len() + start]
            .matches('\n')
            .count()
            + 1;
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| EnvError {
            line,
            message: "unterminated `${`".into(),
        })?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(EnvError {
                line,
                message: format!("`${{{inner}}}` is not a valid variable reference"),
            });
        }
        match lookup(name).or_else(|| default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(EnvError {
                    line,
                    message: format!("environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"),
                })
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cr$t".to_string())
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        let out = substitute("a: ${TOKEN}\nb: ${NOPE:-x}\nc: $HOME", env).unwrap();
        assert_eq!(out, "a: s3cr$t\nb: x\nc: $HOME");
    }

    #[test]
    fn unset_variable_names_its_line() {
        let e = substitute("a: 1\nb: ${MISSING}\n", env).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("MISSING"), "{}", e.message);
    }

    #[test]
    fn rejects_malformed_references() {
        assert!(substitute("a: ${1X}", env).is_err());
        assert!(substitute("a: ${TOKEN", env).is_err());
        assert!(substitute("a: ${}", env).is_err());
    }
}
