//! The OpenAPI document against the server it describes: schemathesis (installed by
//! `scripts/check.sh` in `target/python-sdk`) fuzzes every operation of `/v1/openapi.json`
//! for 60 s with all its checks (status codes, content types, response schemas, negative
//! and positive data, auth, methods) against a real `tessera server` holding a key and a
//! lease. Settings and their reasons: `tests/cli/schemathesis.toml`.

use std::path::PathBuf;
use std::process::Command;

use super::{ServerProcess, checkout_cad, ok, setup_vendor, token};

/// The schemathesis release `scripts/check.sh` installs.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
const FUZZ_SECONDS: &str = "60";
const SEED: &str = "1";

fn schemathesis() -> PathBuf {
    let bin =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/python-sdk/bin/schemathesis");
    let version = Command::new(&bin).arg("--version").output();
    match version {
        Ok(output) if String::from_utf8_lossy(&output.stdout).contains(SCHEMATHESIS_VERSION) => bin,
        Ok(output) => panic!(
            "{} is not schemathesis {SCHEMATHESIS_VERSION} ({}): run bash scripts/check.sh, which installs it in target/python-sdk",
            bin.display(),
            String::from_utf8_lossy(&output.stdout).trim()
        ),
        Err(error) => panic!(
            "schemathesis is missing at {} ({error}): run bash scripts/check.sh, which installs it in target/python-sdk",
            bin.display()
        ),
    }
}

#[test]
fn the_openapi_document_holds_against_a_fuzzer() {
    let schemathesis = schemathesis();
    let dir = tempfile::tempdir().unwrap();
    setup_vendor(dir.path());
    let server = ServerProcess::start(dir.path());
    let token = token(dir.path());
    let remote = ["--server", server.url.as_str(), "--token", token.as_str()];
    // Something to find: a key and a lease.
    let key_file = dir.path().join("cad.json");
    ok(&[&["keys", "add", key_file.to_str().unwrap()][..], &remote].concat());
    checkout_cad(&remote, "ws-1");
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cli/schemathesis.toml");
    let authorization = format!("Authorization: Bearer {token}");
    let output = Command::new(&schemathesis)
        .arg("--config-file")
        .arg(&config)
        .args([
            "run",
            &format!("{}/v1/openapi.json", server.url),
            "--checks",
            "all",
            "--mode",
            "all",
            "--max-time",
            FUZZ_SECONDS,
            "--seed",
            SEED,
            "--workers",
            "1",
            "--header",
            &authorization,
            "--no-color",
        ])
        // Its reports and caches go to the temporary directory, not the source tree.
        .current_dir(dir.path())
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found the document and the server disagree ({}):\n{report}",
        output.status
    );
    // The server is still whole after the run.
    let (status, _) = super::http_get(&format!("{}/healthz", server.url));
    assert_eq!(status, 200, "{report}");
    server.terminate();
}
