//! Reading the docs and `--help`: code spans, command lines, configuration tables, flags, environment variables,
//! metric names; clap's help blocks. Without a regex crate, so each rule is spelled out.

use std::collections::BTreeMap;

/// One documentation file.
pub(super) struct Doc {
    pub(super) path: String,
    pub(super) text: String,
}

impl Doc {
    /// `file:line` of a byte offset.
    pub(super) fn at(&self, offset: usize) -> String {
        let line = self.text[..offset].matches('\n').count() + 1;
        format!("{}:{line}", self.path)
    }
}

/// What `--help` says about one flag.
#[derive(Debug)]
pub(super) struct Arg {
    pub(super) env: Option<String>,
    pub(super) default: Option<String>,
}

/// clap's help: an option starts on a line indented at most 6 spaces with `-x, --name` or `--name`; its
/// description, `[env: NAME=value]` and `[default: value]` follow on that line or the next ones.
pub(super) fn parse_help(text: &str) -> BTreeMap<String, Arg> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let long = if trimmed.starts_with("--") {
            Some(trimmed)
        } else if trimmed.starts_with('-') && trimmed.get(2..5) == Some(", -") {
            Some(&trimmed[4..])
        } else {
            None
        };
        match long {
            Some(long) if indent <= 6 => {
                let len = long
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-')
                    .count();
                blocks.push((long[..len].to_string(), long[len..].to_string()));
            }
            _ => {
                if let Some((_, block)) = blocks.last_mut() {
                    block.push('\n');
                    block.push_str(trimmed);
                }
            }
        }
    }
    blocks
        .into_iter()
        .map(|(name, block)| {
            let bracket = |key: &str| {
                let start = block.find(key)? + key.len();
                let len = block[start..].find(']')?;
                Some(block[start..start + len].to_string())
            };
            let env = bracket("[env: ").map(|e| e.split('=').next().unwrap_or_default().to_string());
            (
                name,
                Arg {
                    env,
                    default: bracket("[default: "),
                },
            )
        })
        .collect()
}

/// One row of a configuration table.
pub(super) struct Row {
    pub(super) offset: usize,
    pub(super) command: &'static str,
    pub(super) flag: String,
    /// Byte range of the flag cell, left out of the general flag check.
    pub(super) cell: std::ops::Range<usize>,
    pub(super) env: Option<String>,
    /// The value in backticks, `None` for "unset" or "—", or the cell when it is neither.
    pub(super) default: Result<Option<String>, String>,
}

/// Rows of the tables whose header reads `` | `fmnist serve` flag | env | default | … ``.
pub(super) fn config_tables(doc: &Doc) -> Vec<Row> {
    let mut lines = Vec::new();
    let mut offset = 0;
    for line in doc.text.split('\n') {
        lines.push((offset, line));
        offset += line.len() + 1;
    }
    let mut rows = Vec::new();
    let mut i = 0;
    while i + 1 < lines.len() {
        let header = cells(lines[i].1);
        let separator = cells(lines[i + 1].1);
        let is_separator = !separator.is_empty()
            && separator
                .iter()
                .all(|(_, c)| !c.is_empty() && c.chars().all(|ch| "-: ".contains(ch)));
        let names: Vec<String> = header.iter().map(|(_, c)| c.replace('`', "").to_lowercase()).collect();
        let command = match names.first() {
            Some(first) if first.contains("fmnist serve") && first.contains("flag") => Some("serve"),
            Some(first) if first.contains("fmnist classify") && first.contains("flag") => Some("classify"),
            _ => None,
        };
        let env_col = names.iter().position(|n| n == "env");
        let default_col = names.iter().position(|n| n == "default");
        let (Some(command), true, Some(env_col), Some(default_col)) = (command, is_separator, env_col, default_col)
        else {
            i += 1;
            continue;
        };
        i += 2;
        while i < lines.len() && lines[i].1.trim_start().starts_with('|') {
            let (start, line) = lines[i];
            let row = cells(line);
            let cell = |n: usize| row.get(n).map(|(_, c)| c.as_str()).unwrap_or("");
            let spans = |c: &str| -> Vec<String> { code_spans(c).into_iter().map(|(_, s)| s).collect() };
            let (flag_at, _) = row.first().cloned().unwrap_or_default();
            let flag_cell = cell(0);
            let flag = spans(flag_cell)
                .into_iter()
                .next()
                .unwrap_or_else(|| flag_cell.to_string());
            let default_cell = cell(default_col).trim();
            let default = if default_cell.starts_with('`') {
                Ok(spans(default_cell).into_iter().next())
            } else if default_cell.starts_with("unset") || default_cell.starts_with('—') {
                Ok(None)
            } else {
                Err(default_cell.to_string())
            };
            rows.push(Row {
                offset: start,
                command,
                flag: flag.trim().to_string(),
                cell: start + flag_at..start + flag_at + flag_cell.len(),
                env: spans(cell(env_col)).into_iter().next(),
                default,
            });
            i += 1;
        }
    }
    rows
}

/// A table row's cells with their byte offsets in the line, trimmed; empty when the line is not a row.
pub(super) fn cells(line: &str) -> Vec<(usize, String)> {
    let trimmed = line.trim_end();
    if !trimmed.trim_start().starts_with('|') {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut start = line.find('|').unwrap() + 1;
    while let Some(len) = line[start..].find('|') {
        let raw = &line[start..start + len];
        let lead = raw.len() - raw.trim_start().len();
        out.push((start + lead, raw.trim().to_string()));
        start += len + 1;
    }
    out
}

/// `text` with the flag cells of configuration tables replaced by spaces (offsets stay the same).
pub(super) fn blank_table_flag_cells(text: &str, rows: &[Row]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for row in rows {
        bytes[row.cell.clone()].fill(b' ');
    }
    String::from_utf8(bytes).expect("ASCII spaces replace whole cells")
}

/// A piece of a document: prose, one code span, or one command line of a fenced block.
pub(super) struct Piece {
    pub(super) offset: usize,
    pub(super) text: String,
    pub(super) code: bool,
}

pub(super) fn pieces(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut prose_start = 0;
    let mut offset = 0;
    let mut fence: Option<String> = None;
    let mut continued: Option<(usize, String)> = None;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let trimmed = body.trim_start();
        if fence.is_none() && trimmed.starts_with("```") {
            pieces.extend(prose_pieces(&text[prose_start..offset], prose_start));
            fence = Some(trimmed.chars().take_while(|c| *c == '`').collect());
        } else if let Some(f) = &fence {
            if trimmed.starts_with(f.as_str()) {
                fence = None;
                prose_start = offset + line.len();
            } else {
                let (start, mut joined) = continued.take().unwrap_or((offset, String::new()));
                match body.strip_suffix('\\') {
                    Some(part) => {
                        joined.push_str(part);
                        joined.push(' ');
                        continued = Some((start, joined));
                    }
                    None => {
                        joined.push_str(body);
                        pieces.push(Piece {
                            offset: start,
                            text: joined,
                            code: true,
                        });
                    }
                }
            }
        }
        offset += line.len();
    }
    if fence.is_none() {
        pieces.extend(prose_pieces(&text[prose_start..], prose_start));
    }
    pieces
}

/// Splits prose into its code spans and the text between them.
pub(super) fn prose_pieces(text: &str, base: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut last = 0;
    for (at, span) in code_spans_with_ends(text) {
        pieces.push(Piece {
            offset: base + last,
            text: text[last..at.start].to_string(),
            code: false,
        });
        pieces.push(Piece {
            offset: base + at.start,
            text: span,
            code: true,
        });
        last = at.end;
    }
    pieces.push(Piece {
        offset: base + last,
        text: text[last..].to_string(),
        code: false,
    });
    pieces
}

pub(super) fn code_spans(text: &str) -> Vec<(usize, String)> {
    code_spans_with_ends(text)
        .into_iter()
        .map(|(r, s)| (r.start, s))
        .collect()
}

/// Code spans: a run of n backticks up to the next run of exactly n; the range covers the backticks.
pub(super) fn code_spans_with_ends(text: &str) -> Vec<(std::ops::Range<usize>, String)> {
    let bytes = text.as_bytes();
    let run = |i: usize| bytes[i..].iter().take_while(|b| **b == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run(i);
        let mut j = i + n;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let m = run(j);
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                spans.push((i..j + n, text[i + n..j].trim().to_string()));
                i = j + n;
            }
            None => i += n,
        }
    }
    spans
}

/// `--name` tokens: two dashes not glued to a word, then a lowercase letter or digit.
pub(super) fn flag_tokens(text: &str) -> Vec<(usize, String)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("--") {
        let at = i + found;
        let glued = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'-');
        let name_len = bytes[at + 2..]
            .iter()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'-')
            .count();
        let starts_well = bytes
            .get(at + 2)
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !glued && starts_well {
            let name = text[at..at + 2 + name_len].trim_end_matches('-').to_string();
            out.push((at, name));
        }
        i = at + 2 + name_len;
    }
    out
}

/// The flags a piece names, each with the subcommand it belongs to (`None`: another tool's, not checked).
pub(super) fn flags_in(piece: &Piece) -> Vec<(usize, String, &'static str)> {
    if !piece.code {
        return flag_tokens(&piece.text)
            .into_iter()
            .map(|(at, flag)| (piece.offset + at, flag, "serve"))
            .collect();
    }
    let mut out = Vec::new();
    let text = &piece.text;
    let mut start = 0;
    let mut segments = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let sep = match bytes[i] {
            b'|' | b';' => 1,
            b'&' if bytes.get(i + 1) == Some(&b'&') => 2,
            b'$' if bytes.get(i + 1) == Some(&b'(') => 2,
            _ => 0,
        };
        if sep > 0 {
            segments.push(start..i);
            start = i + sep;
            i += sep;
        } else {
            i += 1;
        }
    }
    segments.push(start..text.len());
    for range in segments {
        let segment = &text[range.clone()];
        let mut words: Vec<(usize, &str)> = Vec::new();
        let mut pos = 0;
        for word in segment.split_whitespace() {
            let at = segment[pos..].find(word).unwrap() + pos;
            words.push((at, word));
            pos = at + word.len();
        }
        let mut w = 0;
        while w < words.len() {
            let word = words[w].1;
            let assignment = word.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            });
            if ["$", "sudo", "exec", "time"].contains(&word) || assignment {
                w += 1;
            } else if word == "nice" {
                w += if words.get(w + 1).map(|x| x.1) == Some("-n") {
                    3
                } else {
                    1
                };
            } else {
                break;
            }
        }
        let Some(&(_, first)) = words.get(w) else {
            continue;
        };
        let (command, from) = if first == "fmnist" || first.ends_with("/fmnist") {
            match words.get(w + 1).map(|x| x.1) {
                Some("classify") => ("classify", w + 2),
                Some("serve") => ("serve", w + 2),
                _ => ("serve", w + 1),
            }
        } else if first.starts_with("--") {
            ("serve", w)
        } else {
            continue;
        };
        for &(at, word) in &words[from..] {
            for (inner, flag) in flag_tokens(word) {
                out.push((piece.offset + range.start + at + inner, flag, command));
            }
        }
    }
    out
}

/// "`--flag` defaults to `value`" and "`--flag`, which defaults to `value`".
pub(super) fn prose_defaults(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (range, span) in code_spans_with_ends(text) {
        let is_flag = span.starts_with("--")
            && span.len() > 2
            && span[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !is_flag {
            continue;
        }
        let after = &text[range.end..];
        let after = after.strip_prefix(", which").unwrap_or(after);
        let Some(rest) = after.strip_prefix(" defaults to `") else {
            continue;
        };
        if let Some(len) = rest.find('`') {
            out.push((range.start, span.clone(), rest[..len].to_string()));
        }
    }
    out
}

/// `FMNIST_NAME` tokens; `FMNIST_PREFIX_*` as a prefix (true).
pub(super) fn env_vars(text: &str) -> Vec<(usize, String, bool)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("FMNIST_") {
        let at = i + found;
        let glued = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let len = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || **b == b'_')
            .count();
        let name = &text[at..at + len];
        let wildcard = bytes.get(at + len) == Some(&b'*');
        if !glued && name.len() > "FMNIST_".len() {
            if wildcard {
                out.push((at, name.to_string(), true));
            } else if !name.ends_with('_') {
                out.push((at, name.to_string(), false));
            }
        }
        i = at + len.max(1);
    }
    out
}

/// `fmnist_name` metric names, leaving out the crate's own name (`fmnist_serve::…`).
pub(super) fn metric_names(text: &str) -> Vec<(usize, String)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("fmnist_") {
        let at = i + found;
        let glued = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let len = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'_')
            .count();
        let name = text[at..at + len].trim_end_matches('_');
        if !glued && name.len() > "fmnist".len() && name != "fmnist_serve" {
            out.push((at, name.to_string()));
        }
        i = at + len.max(1);
    }
    out
}

#[test]
fn the_doc_parsers_read_what_the_docs_write() {
    let help = "Usage: fmnist serve [OPTIONS]\n\nOptions:\n      --listen <LISTEN>\n          Address.\n\n          \
                [env: FMNIST_LISTEN=]\n          [default: 0.0.0.0:50051]\n\n      --ort-optimization <ORT_OPTIMIZATION>\n          \
                Level.\n\n          Possible values:\n          - all: Everything\n\n          [env: FMNIST_ORT_OPTIMIZATION=]\n          \
                [default: all]\n\n      --model <MODEL>  Model [default: \"\"]\n      --key <KEY>  Key [env: FMNIST_KEY]\n  \
                -h, --help\n          Print help\n";
    let args = parse_help(help);
    assert_eq!(args["--listen"].env.as_deref(), Some("FMNIST_LISTEN"));
    assert_eq!(args["--listen"].default.as_deref(), Some("0.0.0.0:50051"));
    assert_eq!(args["--ort-optimization"].default.as_deref(), Some("all"));
    assert_eq!(args["--model"].default.as_deref(), Some("\"\""));
    assert_eq!(args["--key"].env.as_deref(), Some("FMNIST_KEY"));
    assert_eq!(args["--key"].default, None);
    assert!(args.contains_key("--help"));
    assert!(!args.contains_key("-"), "possible values are not flags");

    let doc = Doc {
        path: "x.md".into(),
        text: "a\n\n| `fmnist serve` flag | env | default | what |\n| --- | --- | --- | --- |\n| `--listen` | `FMNIST_LISTEN` | \
               `0.0.0.0:50051` | gRPC |\n| `--tls-cert` | `FMNIST_TLS_CERT` | unset | PEM |\n\nUse `cargo test --release`, \
               `--drain-timeout-s 5` and --log-format; `fmnist classify --json f.png`.\n\n```sh\nnice -n 10 \
               target/release/fmnist serve \\\n  --metrics-listen x # FMNIST_ORT_*\npip install --no-deps\n```\n\
               `--model-poll-s` defaults to `10`, `fmnist_requests_total{rpc}` and `fmnist_serve::model`.\n"
            .into(),
    };
    let rows = config_tables(&doc);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].flag.as_str(), rows[0].env.as_deref()),
        ("--listen", Some("FMNIST_LISTEN"))
    );
    assert_eq!(rows[0].default, Ok(Some("0.0.0.0:50051".into())));
    assert_eq!(rows[1].default, Ok(None));
    assert_eq!(doc.at(rows[1].offset), "x.md:6");
    let text = blank_table_flag_cells(&doc.text, &rows);
    let flags: Vec<(String, &str)> = pieces(&text)
        .iter()
        .flat_map(flags_in)
        .map(|(_, flag, command)| (flag, command))
        .collect();
    assert_eq!(
        flags,
        [
            ("--drain-timeout-s".to_string(), "serve"),
            ("--log-format".to_string(), "serve"),
            ("--json".to_string(), "classify"),
            ("--metrics-listen".to_string(), "serve"),
            ("--model-poll-s".to_string(), "serve"),
        ]
    );
    let defaults = prose_defaults(&doc.text);
    assert_eq!(defaults.len(), 1);
    assert_eq!(
        (defaults[0].1.as_str(), defaults[0].2.as_str()),
        ("--model-poll-s", "10")
    );
    let envs: Vec<(String, bool)> = env_vars(&doc.text).into_iter().map(|(_, n, p)| (n, p)).collect();
    assert_eq!(
        envs,
        [
            ("FMNIST_LISTEN".to_string(), false),
            ("FMNIST_TLS_CERT".to_string(), false),
            ("FMNIST_ORT_".to_string(), true),
        ]
    );
    let metrics: Vec<String> = metric_names(&doc.text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(metrics, ["fmnist_requests_total"]);
}
