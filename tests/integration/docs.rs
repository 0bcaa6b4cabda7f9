//! The documentation says what the binary does. README.md and docs/*.md name flags, environment variables,
//! defaults and metric names; each must be what `fmnist serve --help`, `fmnist classify --help` and a live
//! server's /metrics say. A failure names the file, the line, the flag or metric, and the mismatch.
//!
//! What the docs write so that this can be checked (docs/testing.md, "The docs test"):
//! - a flag in a code span or command line that starts with `fmnist classify` is `fmnist classify`'s; one in a
//!   command line that starts with `fmnist` or `fmnist serve`, in a code span that starts with the flag, or in
//!   prose, is `fmnist serve`'s. Other tools' command lines (`cargo test --release`, `pip install
//!   --require-hashes`) are not checked;
//! - a configuration table's header reads `` | `fmnist serve` flag | env | default | … `` (or `fmnist
//!   classify`), with each default as `--help` prints it, in backticks, or "unset" or "—" where it prints none;
//!   together the tables list every flag of that command;
//! - prose states a default as "`--flag` defaults to `value`" (or "`--flag`, which defaults to `value`").

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use crate::common;

mod parse;

use common::{fixture, raw, repo, request, spawn_binary};
use fmnist_serve::pb::classifier_client::ClassifierClient;
use parse::{
    Arg, Doc, blank_table_flag_cells, config_tables, env_vars, flags_in, metric_names, parse_help, pieces,
    prose_defaults,
};

/// Counters that only move on failures a test cannot cause cheaply (an `accept` that fails when file
/// descriptors run out; a decode abandoned between two images of a call whose caller left; a metrics-port
/// connection closed for a slow head or evicted, which `slots.rs` covers; failures past the log's rate, which
/// `reliability.rs` covers), or only with an option or a host the test server may not have (the capture, a cgroup memory limit). The binary must
/// still contain their names.
const RARE_METRICS: [&str; 6] = [
    "fmnist_accept_errors_total",
    // Only with --capture-dir; tests/drift.sh reads it from a server capturing.
    "fmnist_capture_records_total",
    // Only where a cgroup memory limit applies (a container with a limit; a test machine may have none).
    "fmnist_memory_limit_bytes",
    "fmnist_failures_not_logged_total",
    "fmnist_decodes_abandoned_total",
    "fmnist_metrics_connections_closed_total",
];

#[test]
fn every_documented_flag_environment_variable_and_default_is_the_binarys() {
    let helps = [Help::of("serve"), Help::of("classify")];
    let (serve, classify) = (&helps[0], &helps[1]);
    let known_env: BTreeSet<&str> = helps
        .iter()
        .flat_map(|h| h.args.values().filter_map(|a| a.env.as_deref()))
        .collect();
    let mut problems = Vec::new();
    let mut tabled: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();

    for doc in docs() {
        let tables = config_tables(&doc);
        for row in &tables {
            let help = if row.command == "classify" { classify } else { serve };
            tabled.entry(help.command).or_default().insert(row.flag.clone());
            let at = doc.at(row.offset);
            let Some(arg) = help.args.get(&row.flag) else {
                problems.push(format!(
                    "{at}: `{}` is in a `fmnist {}` configuration table, but `fmnist {} --help` has no such flag",
                    row.flag, help.command, help.command
                ));
                continue;
            };
            if row.env != arg.env {
                problems.push(format!(
                    "{at}: `{}`: the table says env {}, `fmnist {} --help` says {}",
                    row.flag,
                    shown(&row.env),
                    help.command,
                    shown(&arg.env)
                ));
            }
            match &row.default {
                Err(cell) => problems.push(format!(
                    "{at}: `{}`: the default cell must start with the value in backticks, or say \"unset\" or \
                     \"—\"; it reads {cell:?}",
                    row.flag
                )),
                Ok(default) if *default != arg.default => problems.push(format!(
                    "{at}: `{}`: the table says the default is {}, `fmnist {} --help` says {}",
                    row.flag,
                    shown(default),
                    help.command,
                    shown(&arg.default)
                )),
                Ok(_) => {}
            }
        }

        // Everything else: flags in command lines, code spans and prose, with the tables' flag cells left out
        // (their command is the table's, checked above).
        let text = blank_table_flag_cells(&doc.text, &tables);
        for piece in pieces(&text) {
            for (offset, flag, command) in flags_in(&piece) {
                let help = if command == "classify" { classify } else { serve };
                if !help.args.contains_key(&flag) {
                    let kind = if piece.code {
                        ""
                    } else {
                        " (in prose, so an `fmnist serve` flag)"
                    };
                    problems.push(format!(
                        "{}: `{flag}`{kind} is not a flag of `fmnist {}`: `fmnist {} --help` does not list it (if \
                         it is another tool's, write the tool in the same code span)",
                        doc.at(offset),
                        help.command,
                        help.command
                    ));
                }
            }
        }
        for (offset, flag, value) in prose_defaults(&doc.text) {
            let at = doc.at(offset);
            match serve.args.get(&flag) {
                None => problems.push(format!("{at}: `{flag}` is not a flag of `fmnist serve`")),
                Some(arg) if arg.default.as_deref() != Some(value.as_str()) => problems.push(format!(
                    "{at}: the text says `{flag}` defaults to `{value}`, `fmnist serve --help` says {}",
                    shown(&arg.default)
                )),
                Some(_) => {}
            }
        }
        for (offset, name, prefix) in env_vars(&doc.text) {
            let found = if prefix {
                known_env.iter().any(|e| e.starts_with(&name))
            } else {
                known_env.contains(name.as_str())
            };
            if !found {
                let pattern = if prefix { format!("{name}*") } else { name };
                problems.push(format!(
                    "{}: environment variable `{pattern}` is not one that `fmnist serve --help` or `fmnist classify \
                     --help` names",
                    doc.at(offset)
                ));
            }
        }
    }

    for help in &helps {
        let Some(listed) = tabled.get(help.command) else {
            continue;
        };
        for flag in help.args.keys() {
            if flag != "--help" && flag != "--version" && !listed.contains(flag) {
                problems.push(format!(
                    "`fmnist {} --help` has `{flag}`, which no `fmnist {}` configuration table in README.md or \
                     docs/*.md lists",
                    help.command, help.command
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the docs disagree with the binary:\n{}",
        problems.join("\n")
    );
}

#[tokio::test]
async fn every_documented_metric_is_exported_by_a_live_server() {
    let mut documented: BTreeMap<String, String> = BTreeMap::new();
    for doc in docs() {
        for (offset, name) in metric_names(&doc.text) {
            documented.entry(name).or_insert_with(|| doc.at(offset));
        }
    }
    assert!(
        documented.contains_key("fmnist_requests_total"),
        "the docs list metrics (docs/operations.md)"
    );

    // A short idle timeout, so that a silent connection gets closed (and counted) within the test.
    let server = spawn_binary(&["--idle-timeout-s", "2", "--http2-keepalive-s", "1"]);
    // One call with an image that reaches the model and one that the input check rejects.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let (pixels, _) = fixture()[0];
    ClassifierClient::new(channel)
        .classify(request(vec![raw(&pixels), raw(&[0u8; 784])]))
        .await
        .expect("Classify answers");
    // An anonymous unload of a model that is not the default: refused where model control is off.
    http(&server.addr, "POST /v2/repository/models/dense/unload").await;
    // A connection that never says anything, until the server closes it.
    let mut silent = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncReadExt;
        silent.read(&mut [0u8; 64]).await
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "a silent connection is closed after --idle-timeout-s: {closed:?}"
    );

    let text = server.metrics().await;
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let binary = std::fs::read(env!("CARGO_BIN_EXE_fmnist")).expect("the binary is readable");
    let mut problems = Vec::new();
    for (name, at) in &documented {
        let live = ["", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| exported.contains(format!("{name}{suffix}").as_str()));
        let rare = RARE_METRICS.contains(&name.as_str()) && binary.windows(name.len()).any(|w| w == name.as_bytes());
        if !live && !rare {
            problems.push(format!(
                "{at}: metric `{name}` is not in a live server's /metrics (after a call, a refused unload and a \
                 closed idle connection)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "the docs name metrics the server does not export:\n{}\nexported: {}",
        problems.join("\n"),
        exported.into_iter().collect::<Vec<_>>().join(", ")
    );
}

/// Sends one HTTP/1.1 request without a body and reads the answer to the end.
async fn http(addr: &str, request_line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("{request_line} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

fn shown(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("`{v}`"),
        None => "none".into(),
    }
}

/// README.md and docs/*.md.
fn docs() -> Vec<Doc> {
    let root = repo();
    let mut paths = vec!["README.md".to_string()];
    let mut pages: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    pages.sort();
    paths.extend(pages);
    paths
        .into_iter()
        .map(|path| Doc {
            text: std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}")),
            path,
        })
        .collect()
}

/// A subcommand's flags, from its `--help`.
struct Help {
    command: &'static str,
    args: BTreeMap<String, Arg>,
}

impl Help {
    fn of(command: &'static str) -> Help {
        let mut run = Command::new(env!("CARGO_BIN_EXE_fmnist"));
        // Help prints the variables' current values; the developer's shell must not change them.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("FMNIST_") || key == "ORT_DYLIB_PATH" {
                run.env_remove(key);
            }
        }
        let out = run.args([command, "--help"]).output().expect("the fmnist binary runs");
        let text = String::from_utf8(out.stdout).expect("help is UTF-8");
        assert!(out.status.success(), "fmnist {command} --help failed: {text}");
        let args = parse_help(&text);
        assert!(
            args.contains_key("--help") && args.len() > 2,
            "no flags read from `fmnist {command} --help`:\n{text}"
        );
        Help { command, args }
    }
}

/// Issue #40: `--help` named README sections that had moved to docs/. Every `file.md "Section"` that a
/// `--help` names is a file of the repository with a heading that starts with that section's title.
#[test]
fn every_document_and_section_the_help_points_to_exists() {
    let mut problems = Vec::new();
    let mut pointers = 0;
    for command in ["serve", "classify"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fmnist"))
            .args([command, "--help"])
            .output()
            .expect("the fmnist binary runs");
        // clap wraps long help: a pointer may span lines.
        let text = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for (at, _) in text.match_indices(".md") {
            let start = text[..at]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || "/_-.".contains(c)))
                .map_or(0, |i| i + 1);
            let file = &text[start..at + 3];
            pointers += 1;
            let Ok(doc) = std::fs::read_to_string(repo().join(file)) else {
                problems.push(format!("fmnist {command} --help names {file}, which does not exist"));
                continue;
            };
            let rest = &text[at + 3..];
            if let Some(quoted) = rest.strip_prefix(" \"").and_then(|r| r.split('"').next()) {
                let found = doc
                    .lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .any(|h| h.trim_start_matches('#').trim().starts_with(quoted));
                if !found {
                    problems.push(format!(
                        "fmnist {command} --help names {file} \"{quoted}\": no such heading"
                    ));
                }
            }
        }
    }
    assert!(pointers >= 5, "only {pointers} pointers found: the parser lost them");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
