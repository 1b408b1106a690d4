//! The dashboard end to end in headless Chromium: `dashboard.py` (Playwright's Python
//! package driving the Debian `chromium`) loads the page, sees a volume created through
//! the API, writes to it with qemu-io and sees the write; and asks for the token of an
//! API beyond loopback. A missing Chromium or Playwright fails the tests (`.ci/run`
//! installs both).

use crate::harness::Node;
use std::process::Command;

const SCRIPT: &str = include_str!("dashboard.py");
const CHROMIUM: &str = "/usr/bin/chromium";
const PYTHON: &str = "/usr/bin/python3";

/// Fails unless Chromium and Playwright are there.
fn need_a_browser() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is required by this test (Debian: apt-get install chromium; .ci/run does)"
    );
    let playwright = Command::new(PYTHON).args(["-c", "import playwright.sync_api"]).output();
    assert!(
        playwright.as_ref().is_ok_and(|o| o.status.success()),
        "Playwright for {PYTHON} is required by this test (pip install playwright; .ci/run \
         does): {playwright:?}"
    );
}

/// Runs `dashboard.py ARGS`; returns its output, failing with it (and the node's log).
fn run_script(node: &Node, args: &[&std::ffi::OsStr]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("dashboard.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(PYTHON).arg(&script).args(args).output().expect("run the script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the dashboard check failed ({}):\n{stdout}\n{}\nnode log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(20)
    );
    stdout
}

/// The health pill the node's state calls for: the test machine's own disk may be nearly
/// full, which the node rightly says (its store lives there).
fn expected_health(node: &Node, token: Option<&str>) -> &'static str {
    let mut request = ureq::get(format!("{}/v1/node", node.api()));
    if let Some(t) = token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let body: serde_json::Value =
        request.call().expect("GET /v1/node").body_mut().read_json().expect("JSON");
    if body["space"]["nearly_full"].as_bool().expect("space.nearly_full") {
        "disk nearly full"
    } else {
        "healthy"
    }
}

#[test]
fn the_dashboard_shows_a_new_volume_and_its_io_in_chromium() {
    need_a_browser();
    let node = Node::start();
    let created = ureq::post(format!("{}/v1/volumes", node.api()))
        .header("Content-Type", "application/json")
        .send(r#"{"name": "dash1", "size": "64M"}"#)
        .expect("create a volume through the API");
    assert_eq!(created.status(), 201);

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(shots).unwrap();
    let screenshot = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let api = format!("{}/", node.api());
    let uri = node.uri("dash1");
    let health = expected_health(&node, None);
    let args =
        [api.as_ref(), "dash1".as_ref(), uri.as_ref(), screenshot.as_os_str(), health.as_ref()];
    let stdout = run_script(&node, &args);
    assert!(stdout.contains("the page shows the write"), "{stdout}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    println!("{stdout}screenshot: {}", screenshot.display());
}

#[test]
fn the_dashboard_asks_for_the_token_of_an_api_beyond_loopback() {
    need_a_browser();
    let tmp = tempfile::tempdir().unwrap();
    // Listens on every address; the browser reaches it over loopback only.
    let node = Node::try_start_with(tmp.path(), "0.0.0.0:0").unwrap();
    let token = std::fs::read_to_string(tmp.path().join("api-token")).unwrap();
    let api = format!("{}/", node.api());
    let health = expected_health(&node, Some(token.trim()));
    let args = ["--token".as_ref(), api.as_ref(), token.trim().as_ref(), health.as_ref()];
    let stdout = run_script(&node, &args);
    assert!(stdout.contains(&format!("showed: {health}")), "{stdout}");
}
