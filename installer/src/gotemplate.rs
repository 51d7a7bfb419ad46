//! k3s and RKE2 render `config.toml.tmpl` as a Go template. Its `{{ ... }}` actions are not
//! TOML, so the installer reads a masked copy (actions turned into comments or strings) to
//! check the file, and never rewrites the actions themselves.

use std::path::Path;

use crate::{InstallerError, Result};

/// Whether `text` contains Go template actions.
pub fn has_actions(text: &str) -> bool {
    text.contains("{{")
}

/// A copy of `text` that parses as TOML: a line made only of actions becomes a comment, an
/// action in value position becomes a string, actions inside strings and comments stay.
pub fn mask(text: &str, path: &Path) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        if only_actions(body.trim()) {
            out.push('#');
            out.push_str(body);
        } else {
            out.push_str(
                &mask_inline(body).ok_or_else(|| InstallerError::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!(
                        "line {}: a template action that does not close on its line",
                        number + 1
                    ),
                })?,
            );
        }
        out.push_str(ending);
    }
    Ok(out)
}

fn only_actions(mut s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    while !s.is_empty() {
        let Some(rest) = s.strip_prefix("{{") else {
            return false;
        };
        let Some(end) = rest.find("}}") else {
            return false;
        };
        s = rest[end + 2..].trim_start();
    }
    true
}

/// Replaces actions outside strings and comments with a placeholder string; `None` when an
/// action does not close on the line.
fn mask_inline(line: &str) -> Option<String> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    let mut quote: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        match quote {
            None if rest.starts_with("{{") => {
                let end = rest.find("}}")?;
                out.push_str("\"{{template action}}\"");
                rest = &rest[end + 2..];
                continue;
            }
            None if c == '#' => {
                out.push_str(rest);
                return Some(out);
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            Some('"') if c == '\\' => {
                out.push(c);
                rest = &rest[1..];
                if let Some(escaped) = rest.chars().next() {
                    out.push(escaped);
                    rest = &rest[escaped.len_utf8()..];
                }
                continue;
            }
            Some(q) if c == q => quote = None,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_action_lines_and_values_but_not_strings() {
        let text = "{{ template \"base\" . }}\nenable_selinux = {{ .SELinux }}\nsandbox = \"{{ .Pause }}\"\n  {{- if .X }}  {{ end }}\n# {{ comment\n";
        let masked = mask(text, Path::new("t")).unwrap();
        assert_eq!(
            masked,
            "#{{ template \"base\" . }}\nenable_selinux = \"{{template action}}\"\nsandbox = \"{{ .Pause }}\"\n#  {{- if .X }}  {{ end }}\n# {{ comment\n"
        );
        masked.parse::<toml_edit::DocumentMut>().unwrap();
    }

    #[test]
    fn refuses_an_action_that_spans_lines() {
        let err = mask("a = {{ if\n.X }}\n", Path::new("/x/config.toml.tmpl")).unwrap_err();
        assert!(
            err.to_string().contains("/x/config.toml.tmpl: line 1"),
            "{err}"
        );
    }
}
