//! The SDKs as a vendor ships them, run as real processes against a real license server:
//!
//! - C: `examples/c/hold.c` compiled with the system's C compiler against
//!   `include/tessera.h` and `libtessera.so`: it checks out, holds the lease through the
//!   server going away and coming back (reconnecting, reconnected), and checks in.
//! - Python: `examples/python/hold.py` with the `tessera` package installed from
//!   `bindings/python` (scripts/check.sh installs it into `target/python-sdk`).
//!
//! With a key of another vendor both are refused, whatever the server says.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tessera_client::Client;
use tessera_core::{LicenseKey, LicenseKeyPayload, SecretKey};
use tessera_server::clock::ManualClock;
use tessera_server::ids::LeaseIds;
use tessera_server::{RunningServer, ServerConfig, ServerOptions};

/// Where cargo put this test and the library (`target/<profile>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Compiles the example against the header and the shared library.
fn compile(out: &Path) -> PathBuf {
    let lib_dir = target_dir();
    let library = lib_dir.join("libtessera.so");
    let built = std::fs::metadata(&library).and_then(|m| m.modified());
    let source = std::fs::metadata(workspace().join("crates/tessera-c/src/lib.rs"))
        .and_then(|m| m.modified())
        .unwrap();
    assert!(
        built.is_ok_and(|built| built >= source),
        "{} is missing or older than crates/tessera-c/src/lib.rs: cargo test builds only the \
         rlib, so run cargo build -p tessera-c first (scripts/check.sh does)",
        library.display()
    );
    let program = out.join("hold");
    let status = Command::new("cc")
        .arg(workspace().join("examples/c/hold.c"))
        .arg("-I")
        .arg(workspace().join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-ltessera")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&program)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "the C example does not compile");
    program
}

fn vendor() -> SecretKey {
    SecretKey::from_seed([42; 32])
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

fn key(vendor: &SecretKey, key_id: &str) -> LicenseKey {
    LicenseKey::sign(
        LicenseKeyPayload {
            key_id: key_id.into(),
            customer: "acme".into(),
            components: vec!["cad".into()],
            licenses: 2,
            valid_from: Timestamp::from_millisecond(now_ms() - 86_400_000).unwrap(),
            valid_until: Timestamp::from_millisecond(now_ms() + 86_400_000).unwrap(),
            server_id: None,
            renews: None,
            certified_server_required: false,
            issued_at: Timestamp::from_millisecond(now_ms() - 86_400_000).unwrap(),
        },
        vendor,
    )
    .unwrap()
}

/// A license server trusting `trusted`, on `addr` (port 0: any), its data in `data`. Its
/// clock is the test's (set to now: the application checks tokens by the system clock).
async fn server(
    data: &Path,
    trusted: &SecretKey,
    addr: &str,
    clock: &ManualClock,
) -> RunningServer {
    std::fs::create_dir_all(data).unwrap();
    let trust = data.with_extension("pub");
    std::fs::write(&trust, trusted.public_key().to_file_text()).unwrap();
    let config = ServerConfig {
        data_dir: data.to_path_buf(),
        listen: addr.into(),
        trust: vec![trust],
        // Heartbeats every second.
        lease_ttl: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tessera_server::start(
        listener,
        ServerOptions {
            config,
            clock: Arc::new(clock.clone()),
            ids: LeaseIds::from_seed([3; 32]),
            run_timers: false,
        },
    )
    .await
    .unwrap()
}

struct Program {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Program {
    fn start(program: &Path, vendor_key: &str, servers: &str) -> Program {
        Program::spawn(Command::new(program), vendor_key, servers)
    }

    /// `examples/python/hold.py` with the SDK's Python.
    fn python(vendor_key: &str, servers: &str) -> Program {
        let python = target_dir().parent().unwrap().join("python-sdk/bin/python");
        assert!(
            python.exists(),
            "no {}: scripts/check.sh installs ./bindings/python there (python3 -m venv target/python-sdk && target/python-sdk/bin/pip install ./bindings/python)",
            python.display()
        );
        let mut command = Command::new(python);
        command.arg(workspace().join("examples/python/hold.py"));
        Program::spawn(command, vendor_key, servers)
    }

    fn spawn(mut command: Command, vendor_key: &str, servers: &str) -> Program {
        let mut child = command
            .args([vendor_key, servers, "cad"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Program { child, out }
    }

    /// The next output line that starts with `prefix` (bounded: 20 s).
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no {prefix:?} line within 20 s");
            let mut line = String::new();
            if self.out.read_line(&mut line).unwrap() == 0 {
                panic!("the program ended before printing {prefix:?}");
            }
            if line.starts_with(prefix) {
                return line.trim_end().to_string();
            }
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.child.stdin.as_mut().unwrap(), "{command}").unwrap();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_program_holds_a_verified_lease_across_a_server_restart_and_checks_in() {
    let dir = tempfile::tempdir().unwrap();
    let program = compile(dir.path());
    let vendor = vendor();
    let clock = ManualClock::new(now_ms());
    let data = dir.path().join("server");
    let running = server(&data, &vendor, "127.0.0.1:0", &clock).await;
    let addr = running.addr.to_string();
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    admin
        .import_key(key(&vendor, "k1").to_json_pretty())
        .await
        .unwrap();
    let root = vendor.public_key().to_base64();
    let url = running.url();
    let mut held = tokio::task::spawn_blocking({
        let (program, root, url) = (program.clone(), root.clone(), url.clone());
        move || {
            let mut held = Program::start(&program, &root, &url);
            let line = held.expect("LEASE ");
            (held, line)
        }
    })
    .await
    .unwrap();
    let lease_id = held.1.strip_prefix("LEASE ").unwrap().to_string();
    assert_eq!(admin.status().await.unwrap().leases[0].lease_id, lease_id);

    // The server goes away: the SDK says it is reconnecting; it comes back on the same
    // address with the same data: reconnected, the same lease.
    running.shutdown().await;
    let (program_state, _) = tokio::task::spawn_blocking(move || {
        let line = held.0.expect("EVENT 1 ");
        (held.0, line)
    })
    .await
    .unwrap();
    let running = server(&data, &vendor, &addr, &clock).await;
    let mut held = tokio::task::spawn_blocking(move || {
        let mut held = program_state;
        held.expect("EVENT 2");
        held.send("status");
        let status = held.expect("STATUS ");
        assert_eq!(status, "STATUS 0");
        held.send("checkin");
        let checkin = held.expect("CHECKIN ");
        (held, checkin)
    })
    .await
    .unwrap();
    assert_eq!(held.1, "CHECKIN 0");
    assert!(held.0.child.wait().unwrap().success());
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    assert!(admin.status().await.unwrap().leases.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_program_refuses_a_server_running_on_a_customers_own_vendor_key() {
    let dir = tempfile::tempdir().unwrap();
    let program = compile(dir.path());
    // The customer made their own vendor key and issued themselves a key with it.
    let customer_vendor = SecretKey::from_seed([77; 32]);
    let clock = ManualClock::new(now_ms());
    let running = server(
        &dir.path().join("own"),
        &customer_vendor,
        "127.0.0.1:0",
        &clock,
    )
    .await;
    Client::new(&running.url(), Some(running.state.admin_token.clone()))
        .import_key(key(&customer_vendor, "mine").to_json_pretty())
        .await
        .unwrap();
    let root = vendor().public_key().to_base64();
    let url = running.url();
    let (line, ok) = tokio::task::spawn_blocking(move || {
        let mut refused = Program::start(&program, &root, &url);
        let line = refused.expect("REFUSED ");
        let ok = refused.child.wait().unwrap().code();
        (line, ok)
    })
    .await
    .unwrap();
    assert!(
        line.starts_with("REFUSED 5 lease_untrusted (key)"),
        "{line}"
    );
    assert_eq!(ok, Some(2));
    // The seat the server granted went back.
    assert_eq!(running.state.status().keys[0].in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_program_holds_a_verified_lease_and_refuses_a_customers_own_vendor_key() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = vendor();
    let clock = ManualClock::new(now_ms());
    let running = server(&dir.path().join("server"), &vendor, "127.0.0.1:0", &clock).await;
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    admin
        .import_key(key(&vendor, "k1").to_json_pretty())
        .await
        .unwrap();
    let root = vendor.public_key().to_base64();
    let url = running.url();
    let (mut held, line) = tokio::task::spawn_blocking({
        let (root, url) = (root.clone(), url.clone());
        move || {
            let mut held = Program::python(&root, &url);
            let line = held.expect("LEASE ");
            (held, line)
        }
    })
    .await
    .unwrap();
    let lease_id = line.strip_prefix("LEASE ").unwrap().to_string();
    assert_eq!(admin.status().await.unwrap().leases[0].lease_id, lease_id);
    let (held, status, checkin) = tokio::task::spawn_blocking(move || {
        held.send("status");
        let status = held.expect("STATUS ");
        held.send("checkin");
        let checkin = held.expect("CHECKIN ");
        (held, status, checkin)
    })
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), checkin.as_str()),
        ("STATUS held", "CHECKIN ok")
    );
    let mut held = held;
    assert!(held.child.wait().unwrap().success());
    assert!(admin.status().await.unwrap().leases.is_empty());

    // A server on the customer's own vendor key: refused, the seat returned.
    let customer_vendor = SecretKey::from_seed([77; 32]);
    let own = server(
        &dir.path().join("own"),
        &customer_vendor,
        "127.0.0.1:0",
        &clock,
    )
    .await;
    Client::new(&own.url(), Some(own.state.admin_token.clone()))
        .import_key(key(&customer_vendor, "mine").to_json_pretty())
        .await
        .unwrap();
    let own_url = own.url();
    let (line, code) = tokio::task::spawn_blocking(move || {
        let mut refused = Program::python(&root, &own_url);
        let line = refused.expect("REFUSED ");
        let code = refused.child.wait().unwrap().code();
        (line, code)
    })
    .await
    .unwrap();
    assert!(line.starts_with("REFUSED lease_untrusted "), "{line}");
    assert!(line.contains("(key)"), "{line}");
    assert_eq!(code, Some(2));
    assert_eq!(own.state.status().keys[0].in_use, 0);
}
