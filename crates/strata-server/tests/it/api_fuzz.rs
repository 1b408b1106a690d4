//! The API fuzzed from its own OpenAPI document: schemathesis (PyPI) generates requests
//! for every operation of `/v1/openapi.json` (valid and invalid bodies, paths, queries,
//! and sequences that follow the document's links) against a real node, and checks that
//! none gets a 5xx and that every response has a documented status, content type and
//! schema. Examples are few, to keep CI short. A missing schemathesis fails the test:
//! `.ci/run` installs it in a venv and names it in `STRATA_SCHEMATHESIS`.

use crate::harness::Node;
use std::process::Command;

/// The `st` command: `STRATA_SCHEMATHESIS`, else the venv `.ci/run` makes.
fn schemathesis() -> String {
    std::env::var("STRATA_SCHEMATHESIS").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/strata-schemathesis/bin/st")
    })
}

/// The one exception, for one operation: adding a node answers 503 (unavailable, retry
/// when it runs) when no node answers at its address, and a generated address never has
/// one, so a valid request always gets it there.
const CONFIG: &str = r#"
[[operations]]
include-operation-id = "addNode"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

#[test]
fn the_api_fuzzed_from_its_openapi_document_gives_no_5xx_and_keeps_its_schema() {
    let st = schemathesis();
    let node = Node::start();
    node.create("vm1", "16M");
    let schema = format!("{}/v1/openapi.json", node.api());
    let checks = "not_a_server_error,status_code_conformance,content_type_conformance,\
                  response_schema_conformance";
    // It reads its configuration from, and keeps a cache of what it found in, its working
    // directory: a temporary one.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("schemathesis.toml"), CONFIG).unwrap();
    let out = Command::new(&st)
        .current_dir(work.path())
        .args(["run", &schema, "--max-examples", "10", "--no-color", "--checks", checks])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "schemathesis ({st}) is required by this test (.ci/run installs it: python3 -m \
                 venv ~/.cache/strata-schemathesis && its pip install schemathesis): {e}"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{}\nnode log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(30)
    );
    assert!(stdout.contains("passed") && stdout.contains("generated"), "{stdout}");
    assert!(stdout.contains("schemathesis.toml"), "its configuration was not read:\n{stdout}");
}
