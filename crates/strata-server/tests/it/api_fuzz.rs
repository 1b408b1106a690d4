//! The API fuzzed from its own OpenAPI document: schemathesis (PyPI) generates requests
//! for every operation of `/v1/openapi.json` (valid and invalid bodies, paths, queries,
//! and sequences that follow the document's links) against a real node, and checks that
//! none gets a 5xx, that every response has a documented status, content type, headers
//! and schema, and that the document says what the API accepts: every request it calls
//! valid is accepted (or refused only for the state: 404, 409) and every request it calls
//! invalid is refused with a 4xx. Examples are few (25 an operation, about 10 s), to keep
//! CI short; fewer let a loose pattern in the document pass now and then. A missing
//! schemathesis fails the test: `.ci/run` installs it in a venv and names it in
//! `STRATA_SCHEMATHESIS`.

use crate::harness::Node;
use std::process::Command;

/// The `st` command: `STRATA_SCHEMATHESIS`, else the venv `.ci/run` makes.
fn schemathesis() -> String {
    std::env::var("STRATA_SCHEMATHESIS").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/strata-schemathesis/bin/st")
    })
}

/// Checks of responses, then of requests (`positive_data_acceptance`: a request valid by
/// the document is not refused as a bad request; `negative_data_rejection`: an invalid
/// one is), methods and sequences. Left out: `ignored_auth` and
/// `object_level_authorization`, as the node listens on loopback, where the API takes no
/// token and knows no users; and `ensure_resource_availability`, which takes any 404
/// after a create as the created volume missing, while a rollback of it answers 404 for
/// the snapshot its body names (a CI run failed on that).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      positive_data_acceptance,negative_data_rejection,missing_required_header,\
                      unsupported_method,allow_header_conformance,use_after_free";

/// The one exception, for one operation: adding a node answers 503 (unavailable, retry
/// when it runs) when no node answers at its address, and a generated address never has
/// one, so a valid request always gets it there.
///
/// And every request says `Content-Type: application/json`, as the CLI does: the API
/// refuses a POST or DELETE without it, body or not (a web page of another site could send
/// it), and OpenAPI 3.0 cannot require a Content-Type of an operation without a body.
const CONFIG: &str = r#"
headers = { "Content-Type" = "application/json" }

[[operations]]
include-operation-id = "addNode"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

#[test]
fn the_api_fuzzed_from_its_openapi_document_gives_no_5xx_and_keeps_its_schema() {
    let st = schemathesis();
    let node = Node::start();
    // What the document's examples name: volume vm1 and its snapshot before-upgrade.
    node.create("vm1", "16M");
    let out = node.cli(&["snapshot", "create", "vm1@before-upgrade"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let schema = format!("{}/v1/openapi.json", node.api());
    // It reads its configuration from, and keeps a cache of what it found in, its working
    // directory: a temporary one.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("schemathesis.toml"), CONFIG).unwrap();
    let out = Command::new(&st)
        .current_dir(work.path())
        .args(["run", &schema, "--max-examples", "25", "--no-color", "--checks", CHECKS])
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
