//! The Debian package (`packaging/build-deb.sh`): what it holds, always; installed with
//! `dpkg -i`, its service user, directories and unit, and the server it runs, when the
//! machine may be changed (`TESSERA_PACKAGE_TEST=1` as root, which CI sets).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{BIN, ok};

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_debian_package_installs_a_hardened_service_that_serves() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The test binary, without its debug sections (a release build is what ships).
    let binary = dir.path().join("tessera");
    run("strip", &["-o", binary.to_str().unwrap(), BIN]);
    let built = Command::new("bash")
        .arg(workspace.join("packaging/build-deb.sh"))
        .arg(&binary)
        .arg(dir.path().join("out"))
        .env("TESSERA_DEB_COMPRESS", "gzip")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let package = String::from_utf8(built.stdout).unwrap();
    let package = package.trim();
    assert_eq!(
        run("dpkg-deb", &["-f", package, "Package", "Version"]),
        format!("Package: tessera\nVersion: {}\n", env!("CARGO_PKG_VERSION"))
    );
    let contents = run("dpkg-deb", &["--contents", package]);
    for path in [
        "./usr/bin/tessera",
        "./lib/systemd/system/tessera.service",
        "./etc/tessera/tessera.toml",
        "./usr/share/doc/tessera/install.md",
    ] {
        assert!(contents.contains(path), "{path} missing: {contents}");
    }
    assert!(contents.starts_with("drwxr-xr-x root/root"), "{contents}");
    let unpacked = dir.path().join("unpacked");
    run("dpkg-deb", &["-R", package, unpacked.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(unpacked.join("DEBIAN/conffiles")).unwrap(),
        "/etc/tessera/tessera.toml\n"
    );
    let unit =
        std::fs::read_to_string(unpacked.join("lib/systemd/system/tessera.service")).unwrap();
    for line in [
        "User=tessera",
        "ExecStart=/usr/bin/tessera server --config /etc/tessera/tessera.toml",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "StateDirectory=tessera",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing: {unit}");
    }

    let may_install = std::env::var("TESSERA_PACKAGE_TEST").as_deref() == Ok("1")
        && run("id", &["-u"]).trim() == "0";
    if !may_install {
        eprintln!(
            "not installing the package: set TESSERA_PACKAGE_TEST=1 and run as root (CI does)"
        );
        return;
    }
    run("dpkg", &["-i", package]);
    let installed = std::panic::catch_unwind(|| installed_package_serves(dir.path()));
    // Leave the machine as it was: the package, its data and its user.
    let _ = Command::new("dpkg").args(["--purge", "tessera"]).output();
    let _ = std::fs::remove_dir_all("/var/lib/tessera");
    let _ = std::fs::remove_dir_all("/etc/tessera");
    let _ = Command::new("userdel").arg("tessera").output();
    let _ = Command::new("groupdel").arg("tessera").output();
    if let Err(panic) = installed {
        std::panic::resume_unwind(panic);
    }
}

fn installed_package_serves(dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let passwd = run("getent", &["passwd", "tessera"]);
    assert!(passwd.contains("/usr/sbin/nologin"), "{passwd}");
    let data = std::fs::metadata("/var/lib/tessera").unwrap();
    assert_eq!(data.permissions().mode() & 0o777, 0o700);
    let uid: u32 = run("id", &["-u", "tessera"]).trim().parse().unwrap();
    assert_eq!(data.uid(), uid);
    let config = std::fs::metadata("/etc/tessera/tessera.toml").unwrap();
    assert_eq!(config.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        run("tessera", &["--version"]).trim(),
        format!("tessera {}", env!("CARGO_PKG_VERSION"))
    );
    // The vendor's key in place, the service's command as the service's user.
    ok(&[
        "vendor",
        "init",
        "--dir",
        dir.join("vendor").to_str().unwrap(),
    ]);
    std::fs::copy(dir.join("vendor/vendor.pub"), "/etc/tessera/vendor.pub").unwrap();
    // As the service's user, with no process in between (the kill reaches the server).
    let gid: u32 = run("id", &["-g", "tessera"]).trim().parse().unwrap();
    let mut server = Command::new("/usr/bin/tessera");
    std::os::unix::process::CommandExt::uid(&mut server, uid);
    std::os::unix::process::CommandExt::gid(&mut server, gid);
    let mut server = server
        .args([
            "server",
            "--config",
            "/etc/tessera/tessera.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("HOME", "/var/lib/tessera")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .trim_start_matches("Tessera license server on ")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let output = Command::new("curl")
            .args(["-s", &format!("{url}/healthz")])
            .output()
            .unwrap();
        if output.status.success() && !output.stdout.is_empty() {
            break String::from_utf8(output.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "no /healthz at {url}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = server.kill();
    let _ = server.wait();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    // The server made its identity and token in the data directory, owner-only.
    let token = std::fs::metadata("/var/lib/tessera/admin.token").unwrap();
    assert_eq!((token.uid(), token.permissions().mode() & 0o077), (uid, 0));
}
