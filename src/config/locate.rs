//! Where in the file an error is. Syntax and type errors come from the TOML deserializer
//! (which knows the line); errors found afterwards (a listener naming a missing upstream, a
//! name that does not resolve, ...) are located by looking the offending key up in a
//! span-keeping parse of the same text, made once and kept for every later step.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::ConfigError;

/// Finds keys in the config text, so that errors found after deserialization can still name
/// a line. It owns what it found, so a parsed config can be resolved after the text is gone.
#[derive(Debug, Clone)]
pub(super) struct Locator {
    /// The file, for messages.
    file: PathBuf,
    /// Byte offsets of the text's newlines, in order; offsets below index into the text.
    newlines: Vec<usize>,
    /// Every key, array element and table of the text; empty when the text is not valid TOML,
    /// in which case the deserializer's own error carries the line.
    entries: Vec<Entry>,
}

/// One located item of the config text.
#[derive(Debug, Clone)]
struct Entry {
    /// Dotted path, e.g. `listener[0].upstream` or `upstream[1].servers[0]`.
    path: String,
    /// Where the key is written; None for array elements and `[[table]]` headers.
    key: Option<Range<usize>>,
    /// Where the value is written; for a table, its header.
    value: Option<Range<usize>>,
}

// === impl Locator ===

impl Locator {
    /// Indexes `text` with a span-keeping parse. A text that is not TOML indexes to nothing;
    /// the deserializer then reports the syntax error with its own line.
    pub(super) fn new(text: &str, file: &Path) -> Self {
        let mut entries = Vec::new();
        // toml_edit panics recovering from some invalid documents (`=={\n.`, found by the
        // config fuzz target), so it only sees text that toml accepts.
        if text.parse::<toml::Table>().is_ok() {
            if let Ok(doc) = toml_edit::Document::parse(text) {
                index_table(doc.as_table(), "", &mut entries);
            }
        }
        Locator {
            file: file.to_path_buf(),
            newlines: text
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i)
                .collect(),
            entries,
        }
    }

    /// The file errors name.
    pub(super) fn file(&self) -> &Path {
        &self.file
    }

    /// An error at dotted `key`, on the key's line when the key is written in the file.
    pub(super) fn error(&self, key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
        let key = key.into();
        ConfigError {
            file: self.file.clone(),
            line: self.line_of(&key),
            key: Some(key),
            message: one_line(&message.to_string()),
        }
    }

    /// An error at a byte range of the text, naming whatever key is written there.
    pub(super) fn error_at(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: Some(self.line_at(span.start)),
            key: self.path_at(span.start).map(str::to_owned),
            message: one_line(&message.to_string()),
        }
    }

    /// Turns the deserializer's error into ours: its span gives the line, and the index gives
    /// the key written there.
    pub(super) fn deserialize_error(&self, error: &toml::de::Error) -> ConfigError {
        let mut message = one_line(error.message());
        let offset = error.span().map(|span| span.start);
        let mut key = offset.and_then(|o| self.path_at(o)).map(str::to_owned);
        // `[listener]` where `[[listener]]` was meant is the likeliest way to get this.
        if message == "invalid type: map, expected a sequence" {
            if let Some(key) = &key {
                message.push_str(&format!("; write [[{key}]] to start each entry"));
            }
        }
        // serde blames a missing field on its table; name the field itself.
        if let Some(field) = missing_field(&message) {
            key = Some(match key {
                Some(table) => format!("{table}.{field}"),
                None => field.to_owned(),
            });
        }
        ConfigError {
            file: self.file.clone(),
            line: offset.map(|o| self.line_at(o)),
            key,
            message,
        }
    }

    /// "`listener[0].name` (line 7)", or just the key when it is not in the file.
    pub(super) fn describe(&self, key: &str) -> String {
        match self.line_of(key) {
            Some(line) => format!("`{key}` (line {line})"),
            None => format!("`{key}`"),
        }
    }

    /// The 1-based line of dotted `key`, if it is written in the file.
    fn line_of(&self, key: &str) -> Option<usize> {
        let entry = self.entries.iter().find(|e| e.path == key)?;
        let span = entry.key.as_ref().or(entry.value.as_ref())?;
        Some(self.line_at(span.start))
    }

    /// The 1-based line holding byte `offset`.
    fn line_at(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    /// The innermost key, element or table written at byte `offset`.
    fn path_at(&self, offset: usize) -> Option<&str> {
        self.entries
            .iter()
            .flat_map(|e| {
                [&e.key, &e.value]
                    .into_iter()
                    .flatten()
                    .map(move |span| (e, span))
            })
            .filter(|(_, span)| span.contains(&offset) || span.start == offset)
            .min_by_key(|(_, span)| span.len())
            .map(|(e, _)| e.path.as_str())
    }
}

// === impl ConfigError ===

/// `FILE:LINE: key `KEY`: MESSAGE`, on one line; the parts not known are left out.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// === helpers ===

/// Records every key, array element and table of `table` under `prefix`.
fn index_table(table: &toml_edit::Table, prefix: &str, out: &mut Vec<Entry>) {
    for (name, item) in table.iter() {
        let path = join(prefix, name);
        let key = table.key(name).and_then(|k| k.span());
        match item {
            toml_edit::Item::None => {}
            toml_edit::Item::Value(value) => {
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: value.span(),
                });
                index_value(value, &path, out);
            }
            toml_edit::Item::Table(inner) => {
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: inner.span(),
                });
                index_table(inner, &path, out);
            }
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, inner) in tables.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    out.push(Entry {
                        path: path.clone(),
                        key: None,
                        value: inner.span(),
                    });
                    index_table(inner, &path, out);
                }
            }
        }
    }
}
/// Records the elements of an array or inline table written at `path`.
fn index_value(value: &toml_edit::Value, path: &str, out: &mut Vec<Entry>) {
    match value {
        toml_edit::Value::Array(array) => {
            for (i, element) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    key: None,
                    value: element.span(),
                });
                index_value(element, &path, out);
            }
        }
        toml_edit::Value::InlineTable(table) => {
            for (name, element) in table.iter() {
                let path = join(path, name);
                let key = table.key(name).and_then(|k| k.span());
                out.push(Entry {
                    path: path.clone(),
                    key,
                    value: element.span(),
                });
                index_value(element, &path, out);
            }
        }
        _ => {}
    }
}

/// `prefix.name`, or `name` at the top level.
fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The field of serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Keeps a message on one line, as `FILE:LINE: key `KEY`: MESSAGE` promises.
fn one_line(message: &str) -> String {
    message
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
