//! Project automation. `cargo xtask ci` is the one gate (the README's test command):
//! format check, clippy with warnings denied, every test (nextest when installed), rustdoc
//! with broken links denied, and tidy checks (source hygiene, and the crate and module
//! graphs of `graph`). Std only, so it builds in a second (`json` reads `cargo metadata`).

mod graph;
mod json;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("tidy") => tidy(),
        _ => {
            eprintln!("usage: cargo xtask ci | tidy");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

fn step(name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    eprintln!("== {name}: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("{name}: cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

fn ci() -> Result<(), String> {
    step("format", "cargo", &["fmt", "--all", "--check"], &[])?;
    step(
        "clippy",
        "cargo",
        &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
        &[],
    )?;
    tidy()?;
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if nextest {
        step("tests", "cargo", &["nextest", "run", "--workspace", "--no-fail-fast"], &[])?;
        step("doctests", "cargo", &["test", "--workspace", "--doc"], &[])?;
    } else {
        step("tests", "cargo", &["test", "--workspace", "--no-fail-fast"], &[])?;
    }
    readme_start_command()?;
    fuzz_briefly()?;
    step(
        "docs",
        "cargo",
        &["doc", "--workspace", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    eprintln!("== ci passed");
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask ci` (`bench/fuzz.sh` runs them long).
const FUZZ_SECONDS_CI: u32 = 10;

/// The fuzz targets (fuzz/fuzz_targets/), each run briefly. cargo-fuzz on stable builds
/// without a sanitizer (`-s none`): a panic is what it finds, and bounds are asserted.
fn fuzz_briefly() -> Result<(), String> {
    let fuzz = root().join("fuzz");
    let has = Command::new("cargo").args(["fuzz", "--version"]).output();
    if !has.is_ok_and(|o| o.status.success()) {
        return Err(
            "cargo-fuzz is missing: cargo install cargo-fuzz --locked (.ci/run does)".into()
        );
    }
    let dir = fuzz.to_str().ok_or("the fuzz directory's path is not UTF-8")?;
    step("fuzz build", "cargo", &["fuzz", "build", "--fuzz-dir", dir, "-s", "none"], &[])?;
    let mut targets: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .map_err(|e| format!("fuzz targets: {e}"))?
        .flatten()
        .filter_map(|e| e.path().file_stem().and_then(|s| s.to_str()).map(str::to_owned))
        .collect();
    targets.sort();
    let time = format!("-max_total_time={FUZZ_SECONDS_CI}");
    for target in &targets {
        // The corpus grows in fuzz/corpus/TARGET; committed seeds (fuzz/seeds/TARGET) start
        // it where random bytes take long to reach (a whole NBD handshake).
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let corpus = corpus.to_str().ok_or("the corpus path is not UTF-8")?.to_owned();
        let seeds = fuzz.join("seeds").join(target);
        let seeds = seeds.is_dir().then(|| seeds.to_string_lossy().into_owned());
        let mut args = vec!["fuzz", "run", "--fuzz-dir", dir, "-s", "none", target, &corpus];
        args.extend(seeds.as_deref());
        args.extend(["--", &time, "-rss_limit_mb=2048", "-print_final_stats=0"]);
        step(&format!("fuzz {target}"), "cargo", &args, &[])?;
    }
    Ok(())
}

/// The README starts Strata with `cargo run --release -- up`: `cargo run` must resolve to
/// the `strata` binary (a second binary in the default members once broke it). Checked
/// with a debug build, which the tests have just made.
fn readme_start_command() -> Result<(), String> {
    eprintln!("== readme: cargo run -- --version");
    let out = Command::new("cargo")
        .args(["run", "--quiet", "--", "--version"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.starts_with("strata ") {
        Ok(())
    } else {
        Err(format!(
            "`cargo run -- --version` did not run strata: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Source hygiene the compiler does not check: every crate root opens with `//!`, no
/// `todo!`/`dbg!`/`unimplemented!` in non-test code paths, lines of at most 100 columns;
/// and the dependency graphs (`graph`): the crate graph as ARCHITECTURE.md draws it, the
/// core's pure dependencies, no cycle among the server's modules.
fn tidy() -> Result<(), String> {
    eprintln!("== tidy");
    let mut problems = Vec::new();
    let mut files = Vec::new();
    collect_rs(&root().join("crates"), &mut files);
    collect_rs(&root().join("xtask"), &mut files);
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_root = name == "lib.rs" || name == "main.rs";
        if is_root && !text.trim_start().starts_with("//!") {
            problems.push(format!("{}: crate root lacks a //! header", file.display()));
        }
        for (i, line) in text.lines().enumerate() {
            for banned in
                [concat!("todo", "!("), concat!("dbg", "!("), concat!("unimplemented", "!(")]
            {
                if line.contains(banned) && !line.trim_start().starts_with("//") {
                    problems.push(format!("{}:{}: {banned}", file.display(), i + 1));
                }
            }
            if line.chars().count() > 100 {
                problems.push(format!("{}:{}: longer than 100 columns", file.display(), i + 1));
            }
        }
    }
    problems.extend(graph::check(&root())?);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("tidy found {} problem(s):\n{}", problems.len(), problems.join("\n")))
    }
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
