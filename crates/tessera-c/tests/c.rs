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
use tessera_client::blocking;
use tessera_client::{BorrowStore, Client, GuardEvent, LeaseGuard};
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

/// Compiles `examples/c/<name>.c` against the header and the shared library.
fn compile(out: &Path, name: &str) -> PathBuf {
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
    let program = out.join(name);
    let status = Command::new("cc")
        .arg(workspace().join(format!("examples/c/{name}.c")))
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

/// `key(..)` with one license, borrowing for up to `borrow_days` and `grace_minutes` of grace.
fn key_with(vendor: &SecretKey, key_id: &str, borrow_days: u32, grace_minutes: u32) -> LicenseKey {
    let payload = LicenseKeyPayload {
        licenses: 1,
        max_borrow_days: borrow_days,
        grace_minutes,
        valid_until: Timestamp::from_millisecond(now_ms() + 30 * 86_400_000).unwrap(),
        ..key(vendor, key_id).payload
    };
    LicenseKey::sign(payload, vendor).unwrap()
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
            max_borrow_days: 0,
            grace_minutes: 0,
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
        Program::spawn(Program::python_command("hold.py"), vendor_key, servers)
    }

    /// A borrow example (`command`) run with `ACTION…`, keeping borrowings in `borrow_dir`.
    fn borrow(
        mut command: Command,
        vendor_key: &str,
        servers: &str,
        borrow_dir: &Path,
        action: &[&str],
    ) -> Program {
        command.env("TESSERA_BORROW_DIR", borrow_dir);
        let mut program = Program::spawn_with(command, vendor_key, servers, action);
        drop(program.child.stdin.take());
        program
    }

    fn python_command(script: &str) -> Command {
        let python = target_dir().parent().unwrap().join("python-sdk/bin/python");
        assert!(
            python.exists(),
            "no {}: scripts/check.sh installs ./bindings/python there (python3 -m venv target/python-sdk && target/python-sdk/bin/pip install ./bindings/python)",
            python.display()
        );
        let mut command = Command::new(python);
        command.arg(workspace().join("examples/python").join(script));
        command
    }

    fn spawn(command: Command, vendor_key: &str, servers: &str) -> Program {
        Program::spawn_with(command, vendor_key, servers, &[])
    }

    fn spawn_with(
        mut command: Command,
        vendor_key: &str,
        servers: &str,
        extra: &[&str],
    ) -> Program {
        let mut child = command
            .args([vendor_key, servers, "cad"])
            .args(extra)
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
    let program = compile(dir.path(), "hold");
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
    let program = compile(dir.path(), "hold");
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
    // The server goes away and comes back: the program's on_event hears both.
    let addr = running.addr.to_string();
    running.shutdown().await;
    let mut held = tokio::task::spawn_blocking(move || {
        held.expect("EVENT reconnecting ");
        held
    })
    .await
    .unwrap();
    let running = server(&dir.path().join("server"), &vendor, &addr, &clock).await;
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    held = tokio::task::spawn_blocking(move || {
        held.expect("EVENT reconnected");
        held
    })
    .await
    .unwrap();
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

/// Polls `done` every 50 ms until it holds (bounded: 20 s).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "not within 20 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A license server with one key of one license that may be borrowed for 7 days.
struct Lender {
    dir: tempfile::TempDir,
    vendor: SecretKey,
    clock: ManualClock,
    data: PathBuf,
    running: RunningServer,
    addr: String,
    admin: Client,
}

impl Lender {
    async fn start() -> Lender {
        let dir = tempfile::tempdir().unwrap();
        let vendor = vendor();
        let clock = ManualClock::new(now_ms());
        let data = dir.path().join("server");
        let running = server(&data, &vendor, "127.0.0.1:0", &clock).await;
        let addr = running.addr.to_string();
        let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
        admin
            .import_key(key_with(&vendor, "lend", 7, 0).to_json_pretty())
            .await
            .unwrap();
        Lender {
            dir,
            vendor,
            clock,
            data,
            running,
            addr,
            admin,
        }
    }
}

/// Borrowing through the blocking Rust API (what the C and Python SDKs call): the seat is
/// counted on the server without heartbeats, the application uses it with no server at all,
/// an edited borrow file or another station's is refused, and returning it early gives the
/// seat back. A key without borrowing refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_borrowed_license_runs_offline_until_returned_and_nothing_else_can_fake_one() {
    let Lender {
        dir,
        vendor,
        clock,
        data,
        running,
        addr,
        admin,
    } = Lender::start().await;
    let root = vendor.public_key();
    let url = running.url();
    let store_dir = dir.path().join("borrowed");
    let sdk = {
        let (root, url, store_dir) = (root, url.clone(), store_dir.clone());
        move || {
            blocking::Client::from_async(Client::new(&url, None).verifying(root))
                .unwrap()
                .with_borrow_store(Some(BorrowStore::new(&store_dir)))
        }
    };

    // Longer than the key allows: refused, nothing kept.
    let refused = tokio::task::spawn_blocking({
        let sdk = sdk.clone();
        move || sdk().borrow("cad", 8 * 24).err().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(refused.code(), Some("borrow_not_allowed"), "{refused}");
    assert!(admin.status().await.unwrap().leases.is_empty());

    let (lease_id, expires) = tokio::task::spawn_blocking({
        let sdk = sdk.clone();
        move || {
            let held = sdk().borrow("cad", 48).unwrap();
            assert!(held.is_borrowed());
            (held.lease_id(), held.lease().expires_at)
        }
    })
    .await
    .unwrap();
    let hours = (expires.as_millisecond() - now_ms()) as f64 / 3_600_000.0;
    assert!((47.9..=48.0).contains(&hours), "{hours} h");
    // The customer's administrator can neither take it back nor remove its key meanwhile.
    assert!(admin.status().await.unwrap().leases[0].borrowed);
    let refused = admin.force_release(&lease_id).await.unwrap_err();
    assert_eq!(refused.code(), Some("lease_borrowed"), "{refused}");
    let refused = admin.remove_key("lend").await.unwrap_err();
    assert_eq!(refused.code(), Some("key_has_borrowings"), "{refused}");
    // Held on the server for two days with no heartbeat: the only seat is taken.
    clock.advance_ms(24 * 3600 * 1000);
    running.state.tick().await.unwrap();
    let other = tessera_api::CheckoutRequest {
        component: "cad".into(),
        station: "another".into(),
        user: String::new(),
        host: String::new(),
        nonce: String::new(),
        holder_key: String::new(),
        borrow_hours: 0,
    };
    let busy = admin.checkout(&other).await.unwrap_err();
    assert_eq!(busy.code(), Some("no_licenses_available"));

    // No server at all: the application still runs on its borrowing.
    running.shutdown().await;
    let offline = tokio::task::spawn_blocking({
        let sdk = sdk.clone();
        move || {
            let held = sdk().checkout("cad", false, None).unwrap();
            (held.is_borrowed(), held.lease_id(), held.lost())
        }
    })
    .await
    .unwrap();
    assert_eq!(offline, (true, lease_id.clone(), None));
    // Used a day later, then with the clock set back to today (to stretch the borrowing):
    // the store remembers the latest time it saw, and the set-back clock is not trusted.
    // (On a copy of the store: the rest of the test uses the real clock.)
    let clock_dir = dir.path().join("clock-test");
    let vendor_dir = BorrowStore::new(&store_dir)
        .for_vendor(Some(&root))
        .dir()
        .to_path_buf();
    let copy_dir = BorrowStore::new(&clock_dir)
        .for_vendor(Some(&root))
        .dir()
        .to_path_buf();
    std::fs::create_dir_all(&copy_dir).unwrap();
    for entry in std::fs::read_dir(&vendor_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy_dir.join(entry.file_name())).unwrap();
    }
    let at_offset = |offset_ms: i64| {
        let (url, store_dir) = (url.clone(), clock_dir.clone());
        tokio::task::spawn_blocking(move || {
            let app = Client::new(&url, None)
                .verifying(root)
                .with_clock(Arc::new(move || now_ms() + offset_ms));
            blocking::Client::from_async(app)
                .unwrap()
                .with_borrow_store(Some(BorrowStore::new(&store_dir)))
                .checkout("cad", false, None)
                .map(|held| held.is_borrowed())
        })
    };
    assert!(at_offset(24 * 3_600_000).await.unwrap().unwrap());
    let set_back = at_offset(0).await.unwrap().unwrap_err();
    assert_eq!(set_back.code(), None, "unreachable, not served: {set_back}");

    // Another station's borrowing (a file copied from another machine) is refused.
    // Kept for this vendor only.
    let kept = BorrowStore::new(&store_dir).for_vendor(Some(&root));
    let stored = kept.load("cad").unwrap();
    let app = Client::new(&url, None).verifying(root);
    let copied = app.borrowed(&stored, "cad", "another-machine").unwrap_err();
    assert_eq!(copied.code(), Some("lease_untrusted"));
    assert!(copied.to_string().contains("(station)"), "{copied}");
    // An edited borrow file (a later end) is refused: no server, no license.
    let edited_dir = dir.path().join("edited");
    let mut edited = stored.clone();
    edited.lease.expires_at = Timestamp::from_millisecond(now_ms() + 400 * 86_400_000).unwrap();
    // The token says when it ends: lengthen it there too, keeping the signature.
    let token = stored.lease.lease_token.clone().unwrap();
    let signature = token.split_once('.').unwrap().1;
    let token_json = base64_url_decode(&token);
    let longer = token_json.replace(
        &format!("\"valid_until\":\"{}\"", stored.lease.expires_at),
        &format!("\"valid_until\":\"{}\"", edited.lease.expires_at),
    );
    assert_ne!(longer, token_json);
    edited.lease.lease_token = Some(format!("{}.{signature}", base64_url_encode(&longer)));
    let edited_store = BorrowStore::new(&edited_dir).for_vendor(Some(&root));
    edited_store.save("cad", &edited).unwrap();
    let refused = tokio::task::spawn_blocking({
        let (root, url, edited_dir) = (root, url.clone(), edited_dir.clone());
        move || {
            blocking::Client::from_async(Client::new(&url, None).verifying(root))
                .unwrap()
                .with_borrow_store(Some(BorrowStore::new(&edited_dir)))
                .checkout("cad", false, None)
                .err()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.code(), None, "unreachable, not served: {refused}");
    // Not used, and not removed either (only an ended borrowing is).
    assert!(edited_store.load("cad").is_some());

    // Back online: returned early, the seat is free again and the file gone.
    let running = server(&data, &vendor, &addr, &clock).await;
    tokio::task::spawn_blocking({
        let sdk = sdk.clone();
        move || {
            let held = sdk().checkout("cad", false, None).unwrap();
            assert!(held.is_borrowed());
            held.checkin().unwrap();
        }
    })
    .await
    .unwrap();
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    assert!(admin.status().await.unwrap().leases.is_empty());
    assert!(kept.load("cad").is_none());
    let (lease, created) = admin.checkout(&other).await.unwrap();
    assert!(created, "{lease:?}");
}

fn base64_url_decode(token: &str) -> String {
    use base64::Engine;
    let payload = token.split_once('.').unwrap().0;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn base64_url_encode(json: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// Grace: with no server to renew it, a lease stays held for the key's `grace_minutes` past
/// the time it should have been renewed (the reconnect event firing meanwhile), then it is
/// lost. The server counts the seat through the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_without_a_server_holds_for_the_keys_grace_then_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = vendor();
    let clock = ManualClock::new(now_ms());
    let running = server(&dir.path().join("server"), &vendor, "127.0.0.1:0", &clock).await;
    let admin = Client::new(&running.url(), Some(running.state.admin_token.clone()));
    admin
        .import_key(key_with(&vendor, "graceful", 0, 10).to_json_pretty())
        .await
        .unwrap();
    // The application's clock, which the test moves.
    let app_now = Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
    let app = Client::new(&running.url(), None)
        .verifying(vendor.public_key())
        .with_clock({
            let app_now = app_now.clone();
            Arc::new(move || app_now.load(std::sync::atomic::Ordering::SeqCst))
        });
    let request = tessera_api::CheckoutRequest {
        component: "cad".into(),
        station: "ws-1".into(),
        user: String::new(),
        host: String::new(),
        nonce: String::new(),
        holder_key: String::new(),
        borrow_hours: 0,
    };
    let (lease, _) = app.checkout(&request).await.unwrap();
    let expires = lease.expires_at.as_millisecond();
    // The server counts the seat through the grace (3 s of lease, 10 minutes of grace).
    let counted = expires - lease.renewed_at.as_millisecond();
    assert_eq!(counted, 3_000 + 10 * 60_000);
    let events = Arc::new(std::sync::Mutex::new(Vec::<GuardEvent>::new()));
    let guard = LeaseGuard::start_with_events(app.clone(), lease, {
        let events = events.clone();
        Arc::new(move |event: &GuardEvent| events.lock().unwrap().push(event.clone()))
    });
    running.shutdown().await;
    let count =
        |kind: fn(&GuardEvent) -> bool| events.lock().unwrap().iter().filter(|e| kind(e)).count();
    let reconnecting = |e: &GuardEvent| matches!(e, GuardEvent::Reconnecting { .. });
    let lost = |e: &GuardEvent| matches!(e, GuardEvent::Lost { .. });
    eventually("reconnecting", || count(reconnecting) >= 1).await;
    // Long past the time it should have been renewed, inside the grace: still held, still
    // reconnecting.
    app_now.store(expires - 60_000, std::sync::atomic::Ordering::SeqCst);
    let before = count(reconnecting);
    eventually("two more tries", || count(reconnecting) >= before + 2).await;
    assert_eq!(count(lost), 0);
    assert_eq!(guard.lost(), None);
    // The grace is over: lost.
    app_now.store(expires, std::sync::atomic::Ordering::SeqCst);
    eventually("lost", || count(lost) == 1).await;
    let reason = guard.lost().unwrap();
    assert!(reason.contains("grace of 10 minutes included"), "{reason}");
}

/// `examples/python/borrow.py`: borrows with a server, uses the borrowing with none, and
/// returns it early when the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_program_borrows_a_license_uses_it_offline_and_returns_it() {
    let program = Arc::new(|| Program::python_command("borrow.py"));
    borrow_round_trip(program, "REFUSED borrow_not_allowed ", "borrowed=True").await;
}

/// `examples/c/borrow.c`, the same with the C library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_program_borrows_a_license_uses_it_offline_and_returns_it() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "borrow");
    let program = Arc::new(move || Command::new(&binary));
    borrow_round_trip(program, "REFUSED 8 ", "borrowed=1").await;
}

/// Borrows (first beyond the key's limit: refused), uses the borrowing with the server down,
/// returns it with the server back; `refused` and `flag` are how the program says so.
async fn borrow_round_trip(
    program: Arc<dyn Fn() -> Command + Send + Sync>,
    refused: &'static str,
    flag: &'static str,
) {
    let Lender {
        dir,
        vendor,
        clock,
        data,
        running,
        addr,
        admin,
    } = Lender::start().await;
    let root = vendor.public_key().to_base64();
    let url = running.url();
    let borrow_dir = dir.path().join("borrowed");
    let run = move |action: &'static [&'static str], prefix: &'static str| {
        let (root, url, borrow_dir, program) = (
            root.clone(),
            url.clone(),
            borrow_dir.clone(),
            program.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut running = Program::borrow(program(), &root, &url, &borrow_dir, action);
            let line = running.expect(prefix);
            let code = running.child.wait().unwrap().code();
            (line, code)
        })
    };
    let (line, code) = run(&["borrow", "192"], "").await.unwrap();
    assert!(line.starts_with(refused), "{line}");
    assert_eq!(code, Some(2));
    let (line, code) = run(&["borrow", "24"], "BORROWED ").await.unwrap();
    assert_eq!(code, Some(0));
    let lease_id = line.split(' ').nth(1).unwrap().to_string();
    assert_eq!(admin.status().await.unwrap().leases[0].lease_id, lease_id);

    running.shutdown().await;
    let (line, code) = run(&["use"], "LEASE ").await.unwrap();
    assert_eq!(line, format!("LEASE {lease_id} {flag}"));
    assert_eq!(code, Some(0));

    let running = server(&data, &vendor, &addr, &clock).await;
    let (line, code) = run(&["return"], "RETURNED ").await.unwrap();
    assert_eq!((line, code), (format!("RETURNED {lease_id}"), Some(0)));
    assert_eq!(running.state.status().keys[0].in_use, 0);
}
