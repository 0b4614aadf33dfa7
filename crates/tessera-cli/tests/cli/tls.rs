//! HTTPS end to end with real processes: a private CA from `tessera tls init`, the authority
//! and a license server serving HTTPS, online sync between them over HTTPS, the CLI trusting
//! the CA with `--ca` or `TESSERA_CA` (and refusing the server without it), and the
//! certificate replaced on SIGHUP without a restart.

use std::time::{Duration, Instant};

use super::{ServerProcess, admin_token_in, checkout_cad, last_line, ok, tessera};

#[test]
fn the_authority_and_a_server_run_over_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let init = ok(&[
        "tls",
        "init",
        "--out",
        &d("tls"),
        "--name",
        "localhost,127.0.0.1",
    ]);
    assert!(init.contains("ca.pem"), "{init}");
    for file in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(dir.path().join("tls").join(file).exists(), "{file}");
    }
    let (ca, cert, key) = (d("tls/ca.pem"), d("tls/server.pem"), d("tls/server.key"));

    let authority = ServerProcess::spawn(
        &[
            "authority",
            "--data",
            &d("authority"),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        "Tessera authority on ",
    );
    assert!(authority.url.starts_with("https://"), "{}", authority.url);
    let vendor_token = admin_token_in(&dir.path().join("authority"));
    let vendor = [
        "--authority",
        authority.url.as_str(),
        "--token",
        vendor_token.as_str(),
    ];
    // Without the CA the vendor's own CLI does not trust the authority.
    let refused = tessera(
        &[
            &["authority", "server", "add", "--customer", "acme"][..],
            &vendor,
        ]
        .concat(),
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        stderr.contains("certificate") || stderr.contains("cannot reach"),
        "{stderr}"
    );
    let with_ca = [&vendor[..], &["--ca", ca.as_str()]].concat();
    let server_id = last_line(&ok(&[
        &["authority", "server", "add", "--customer", "acme"][..],
        &with_ca,
    ]
    .concat()));
    let key_id = last_line(&ok(&[
        &[
            "authority",
            "key",
            "issue",
            "--server-id",
            &server_id,
            "--components",
            "cad",
            "--licenses",
            "2",
            "--valid-days",
            "30",
        ][..],
        &with_ca,
    ]
    .concat()));

    let server = ServerProcess::spawn(
        &[
            "server",
            "--data",
            &d("server"),
            "--listen",
            "127.0.0.1:0",
            "--server-id",
            &server_id,
            "--authority",
            &authority.url,
            // The test drives each sync (the default would sync at start by itself).
            "--sync-schedule",
            "off",
            "--trust",
            &d("authority/vendor.pub"),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ],
        "Tessera license server on ",
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let token = admin_token_in(&dir.path().join("server"));
    let remote = [
        "--server",
        server.url.as_str(),
        "--token",
        token.as_str(),
        "--ca",
        ca.as_str(),
    ];
    // Online sync: the server calls the authority over HTTPS, trusting --tls-ca.
    let synced = ok(&[&["sync"][..], &remote].concat());
    assert!(synced.contains(&key_id), "{synced}");
    let lease = checkout_cad(&remote, "ws-1");
    assert_eq!(lease["key_id"], key_id.as_str());

    // TESSERA_CA works like --ca; without either the server is not trusted.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["status", "--server", &server.url, "--token", &token])
        .env("TESSERA_CA", &ca)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let untrusted = tessera(&["status", "--server", &server.url, "--token", &token]);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr)
            .to_lowercase()
            .contains("certificate")
    );
    // Plain HTTP to the HTTPS port gets nothing.
    let plain = server.url.replace("https://", "http://");
    assert!(
        !tessera(&["status", "--server", &plain, "--token", &token])
            .status
            .success()
    );

    // A new certificate from another CA over the files, then SIGHUP: served at once.
    ok(&[
        "tls",
        "init",
        "--out",
        &d("next"),
        "--name",
        "localhost,127.0.0.1",
    ]);
    std::fs::copy(dir.path().join("next/server.key"), &key).unwrap();
    std::fs::copy(dir.path().join("next/server.pem"), &cert).unwrap();
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let next_ca = d("next/ca.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = tessera(&[
            "status",
            "--server",
            &server.url,
            "--token",
            &token,
            "--ca",
            &next_ca,
        ]);
        if status.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tessera(&[
            "status",
            "--server",
            &server.url,
            "--token",
            &token,
            "--ca",
            &ca
        ])
        .status
        .success()
    );
    server.terminate();
}
