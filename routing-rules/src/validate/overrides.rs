//! A lean reader for the `[overrides]` table, the one part of a rules
//! document that grows to millions of entries. A general TOML parser keeps
//! a tree with spans for every key and value (about 2 KB per override, so
//! 3.4 GB for a 50 MB document); this reads the common line form straight
//! into the map (about 150 bytes per override):
//!
//! ```toml
//! [overrides]
//! "vip-42" = { cell = "cell-a", colour = "green" }   # comment
//! alice = { colour = "blue" }
//! ```
//!
//! Anything it does not recognise — another layout, escapes in strings,
//! dotted keys, a value it cannot read — makes it step aside, and the whole
//! document goes through the TOML parser as before, with its messages.

use std::collections::BTreeMap;

use super::file::FileOverride;
use crate::error::RulesError;
use crate::model::Colour;

/// The document with its `[overrides]` section blanked out (line numbers
/// kept, for the TOML parser's messages), and the overrides read from it.
pub(super) struct Split {
    /// The rest of the document.
    pub(super) rest: String,
    /// The overrides.
    pub(super) overrides: BTreeMap<String, FileOverride>,
}

/// Splits `text` when its `[overrides]` section is in the simple line form;
/// `Ok(None)` when it is not (or there is none); `Err` for a key given twice.
pub(super) fn split(text: &str) -> Result<Option<Split>, RulesError> {
    // The section header: a line `[overrides]` (a comment may follow).
    let mut offset = 0;
    let mut start = None;
    for line in text.split_inclusive('\n') {
        if header_name(line) == Some("overrides") {
            start = Some((offset, offset + line.len()));
            break;
        }
        offset += line.len();
    }
    let Some((header_at, body_at)) = start else {
        return Ok(None);
    };
    let mut overrides = BTreeMap::new();
    let mut end = text.len();
    let mut pos = body_at;
    let first_line = text[..body_at].matches('\n').count() + 1;
    for (i, line) in text[body_at..].split_inclusive('\n').enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            end = pos;
            break;
        }
        pos += line.len();
        let content = strip_comment(trimmed).trim_end();
        if content.is_empty() {
            continue;
        }
        let Some((key, value)) = entry(content) else {
            return Ok(None);
        };
        if overrides.insert(key.to_string(), value).is_some() {
            return Err(RulesError::Parse {
                line: first_line + i,
                column: 1,
                message: format!("duplicate key `{key}` in table `overrides`"),
            });
        }
    }
    // `overrides` defined anywhere else too (another header, a dotted or
    // root key): not the simple form; the TOML parser says what is wrong.
    let elsewhere = |l: &str| {
        let t = l.trim_start();
        header_name(l).is_some_and(|n| n == "overrides" || n.starts_with("overrides."))
            || t.strip_prefix("overrides")
                .is_some_and(|r| r.trim_start().starts_with(['=', '.']))
    };
    if text[..header_at].split_inclusive('\n').any(elsewhere)
        || text[end..].split_inclusive('\n').any(elsewhere)
    {
        return Ok(None);
    }
    let mut rest = String::with_capacity(text.len() - (end - header_at));
    rest.push_str(&text[..header_at]);
    // Blank lines keep the line numbers of what follows.
    rest.extend(std::iter::repeat_n(
        '\n',
        text[header_at..end].matches('\n').count(),
    ));
    rest.push_str(&text[end..]);
    Ok(Some(Split { rest, overrides }))
}

/// The name of a `[table]` header line, if the line is one.
fn header_name(line: &str) -> Option<&str> {
    let t = strip_comment(line.trim()).trim_end();
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    if inner.starts_with('[') {
        return None;
    }
    Some(inner.trim())
}

/// `line` up to a `#` that is outside a string.
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
    }
    line
}

/// A basic string without escapes at the start of `s`: its content and
/// the rest.
fn string(s: &str) -> Option<(&str, &str)> {
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    let content = &s[..end];
    if content.contains('\\') || content.chars().any(|c| c.is_control()) {
        return None;
    }
    Some((content, &s[end + 1..]))
}

/// `KEY = { cell = "C", colour = "blue" }` (either field optional).
fn entry(line: &str) -> Option<(&str, FileOverride)> {
    let (key, rest) = if line.starts_with('"') {
        string(line)?
    } else {
        let n = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(line.len());
        (&line[..n], &line[n..])
    };
    if key.is_empty() && !line.starts_with('"') {
        return None;
    }
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let inner = rest.strip_prefix('{')?.strip_suffix('}')?.trim();
    let mut out = FileOverride {
        cell: None,
        colour: None,
    };
    if inner.is_empty() {
        return Some((key, out));
    }
    for field in inner.split(',') {
        let (name, value) = field.split_once('=')?;
        let (value, after) = string(value.trim())?;
        if !after.trim().is_empty() {
            return None;
        }
        match name.trim() {
            "cell" if out.cell.is_none() => out.cell = Some(value.to_string()),
            "colour" if out.colour.is_none() => {
                out.colour = Some(match value {
                    "blue" => Colour::Blue,
                    "green" => Colour::Green,
                    _ => return None,
                })
            }
            _ => return None,
        }
    }
    Some((key, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simple_form_is_read_and_anything_else_steps_aside() {
        let doc = "slots = 1\n[overrides]\n\"vip 1\" = { cell = \"a\", colour = \"green\" } # x\nbob = { colour = \"blue\" }\n\n[[ranges]]\nfrom = 0\n";
        let s = split(doc).unwrap().unwrap();
        assert_eq!(s.overrides.len(), 2);
        assert_eq!(s.overrides["vip 1"].cell.as_deref(), Some("a"));
        assert_eq!(s.overrides["bob"].colour, Some(Colour::Blue));
        assert_eq!(
            s.rest.lines().count(),
            doc.lines().count(),
            "line numbers kept"
        );
        assert!(s.rest.contains("[[ranges]]") && !s.rest.contains("vip"));
        for other in [
            "[overrides]\n\"a\\tb\" = { cell = \"a\" }\n",
            "[overrides]\na = { cell = \"a\", weight = 1 }\n",
            "[overrides]\na.b = { cell = \"a\" }\n",
            "[overrides]\na = { colour = \"purple\" }\n",
            "[overrides]\na = { cell = \"a\" }\n[overrides.b]\ncell = \"a\"\n",
            "overrides = {}\n",
            "overrides.x = { cell = \"a\" }\n[overrides]\na = {}\n",
            "[overrides]\na = { colour = \"Blue\" }\n",
        ] {
            assert!(split(other).unwrap().is_none(), "{other}");
        }
        let e = split("[overrides]\na = {}\na = { cell = \"x\" }\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("line 3"), "{e}");
    }
}
