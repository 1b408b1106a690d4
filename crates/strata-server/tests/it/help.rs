//! `strata --help` and every subcommand's help: the list of commands comes from the help
//! clap prints, so a new command without examples fails here.

use crate::harness::STRATA;
use std::process::Command;

/// `strata ARGS --help`: its output, which must succeed.
fn help(path: &[String]) -> String {
    let out = Command::new(STRATA).args(path).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "strata {path:?} --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The subcommands a help text lists under "Commands:" (without clap's `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line == "Commands:" {
            inside = true;
        } else if inside && line.trim().is_empty() {
            break;
        } else if inside && line.starts_with("  ") && !line.starts_with("   ") {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn every_command_has_help_with_examples() {
    let mut queue: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = Vec::new();
    let mut missing = Vec::new();
    while let Some(path) = queue.pop() {
        let text = help(&path);
        let shown = format!("strata {}", path.join(" "));
        if !text.lines().any(|l| l.starts_with("Example:") || l.starts_with("Examples:")) {
            missing.push(shown.clone());
        }
        assert!(text.contains("Usage: "), "{shown}: {text}");
        for sub in subcommands(&text) {
            let mut next = path.clone();
            next.push(sub);
            queue.push(next);
        }
        seen.push(shown);
    }
    assert!(missing.is_empty(), "commands whose --help has no Example(s): section: {missing:?}");
    // The walk found the commands (so a change in clap's layout cannot empty it).
    for expected in [
        "strata up",
        "strata serve",
        "strata fsck",
        "strata volume create",
        "strata volume attach",
        "strata snapshot delete",
        "strata cluster status",
        "strata node add",
    ] {
        assert!(seen.iter().any(|s| s == expected), "{expected} not found in {seen:?}");
    }
    assert!(seen.len() >= 24, "{seen:?}");
}

#[test]
fn the_flags_that_follow_a_long_operation_have_examples() {
    let info = help(&["volume".into(), "info".into()]);
    assert!(info.contains("--watch") && info.contains("strata volume info db1 --watch"), "{info}");
    let delete = help(&["snapshot".into(), "delete".into()]);
    assert!(
        delete.contains("--wait")
            && delete.contains("strata snapshot delete vm1@before-upgrade --wait"),
        "{delete}"
    );
}

#[test]
fn the_top_help_names_the_global_options() {
    let text = help(&[]);
    let options = ["--api", "--token", "--json", "--log-format", "STRATA_API", "STRATA_TOKEN"];
    let tls = ["--cacert", "STRATA_CACERT", "--token-file"];
    for option in options.into_iter().chain(tls) {
        assert!(text.contains(option), "{option} missing from strata --help:\n{text}");
    }
    assert!(text.contains("human") && text.contains("json"), "the formats: {text}");
}
