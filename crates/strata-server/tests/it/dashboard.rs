//! The dashboard end to end in headless Chromium: `dashboard.py` (Playwright's Python
//! package driving the Debian `chromium`) loads the page, sees a volume created through
//! the API, writes to it with qemu-io and sees the write. A missing Chromium or
//! Playwright fails the test (`.ci/run` installs both).

use crate::harness::Node;
use std::process::Command;

const SCRIPT: &str = include_str!("dashboard.py");
const CHROMIUM: &str = "/usr/bin/chromium";
const PYTHON: &str = "/usr/bin/python3";

#[test]
fn the_dashboard_shows_a_new_volume_and_its_io_in_chromium() {
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
    let node = Node::start();
    let created = ureq::post(format!("{}/v1/volumes", node.api()))
        .header("Content-Type", "application/json")
        .send(r#"{"name": "dash1", "size": "64M"}"#)
        .expect("create a volume through the API");
    assert_eq!(created.status(), 201);

    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("dashboard.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(shots).unwrap();
    let screenshot = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = Command::new(PYTHON)
        .arg(&script)
        .arg(format!("{}/", node.api()))
        .arg("dash1")
        .arg(node.uri("dash1"))
        .arg(&screenshot)
        .output()
        .expect("run the browser script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the dashboard check failed ({}):\n{stdout}\n{}\nnode log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        node.log_tail(20)
    );
    assert!(stdout.contains("the page shows the write"), "{stdout}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    println!("{stdout}screenshot: {}", screenshot.display());
}
