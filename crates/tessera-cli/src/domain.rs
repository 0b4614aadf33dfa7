//! `tessera domain status|add-host|remove-host`: the hosts of a server domain.

use clap::Subcommand;
use tessera_client::Client;

use crate::Remote;

#[derive(Subcommand)]
pub enum DomainCommand {
    /// Every host: number, address, role (primary/backup), health, replication lag, last
    /// contact. Asks any host (it consults the primary when it can reach it).
    Status {
        /// Print the JSON of GET /v1/domain.
        #[arg(long)]
        json: bool,
    },
    /// Add a host to the running domain (admin). Start it first with the domain's hosts list
    /// (itself included) and `--join`, with copies of server.key, server.pub and admin.token.
    AddHost {
        /// The new host's number.
        #[arg(long)]
        host: u64,
        /// HOST:PORT where the other hosts reach it.
        #[arg(long)]
        address: String,
    },
    /// Remove a host from the running domain (admin).
    RemoveHost {
        /// The host's number.
        #[arg(long)]
        host: u64,
    },
}

pub async fn run(command: DomainCommand, remote: &Remote) -> anyhow::Result<()> {
    let client = remote.client()?;
    match command {
        DomainCommand::AddHost { host, address } => {
            let hosts = client.add_host(host, &address).await?;
            println!("domain hosts: {hosts:?}");
            Ok(())
        }
        DomainCommand::RemoveHost { host } => {
            let hosts = client.remove_host(host).await?;
            println!("domain hosts: {hosts:?}");
            Ok(())
        }
        DomainCommand::Status { json } => {
            let status = client.domain_status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            let primary = status
                .primary
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none".into());
            println!(
                "primary: {primary}   quorum: {}   (view of host {}, answered by host {})",
                if status.quorum { "yes" } else { "no" },
                status.view_of,
                status.answered_by
            );
            println!(
                "{:>4}  {:<22} {:<8} {:<8} {:>8} {:>14}",
                "host", "address", "role", "healthy", "lag", "last contact"
            );
            for host in &status.hosts {
                let lag = host
                    .replication_lag
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into());
                let contact = host
                    .last_contact_ms
                    .map(|ms| format!("{ms} ms ago"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:>4}  {:<22} {:<8} {:<8} {:>8} {:>14}",
                    host.host,
                    host.address.as_deref().unwrap_or("?"),
                    host.role,
                    if host.healthy { "yes" } else { "no" },
                    lag,
                    contact
                );
            }
            Ok(())
        }
    }
}

/// `tessera bench --domain N`: N real `tessera server` processes on loopback (this binary),
/// cycles/s through the primary for each client count, then the failover gap: stations
/// using the failover client over every host run checkout+checkin, the primary is killed
/// with SIGKILL, and the longest time without any successful checkout is reported.
pub async fn bench(hosts: usize, clients: &[usize], seconds: u64) -> anyhow::Result<()> {
    use std::time::Duration;

    if !(3..=tessera_server::domain::HOSTS_MAX).contains(&hosts) {
        anyhow::bail!("--domain must be 3 to 20 hosts");
    }
    if seconds == 0 || seconds > 600 {
        anyhow::bail!("--seconds must be 1 to 600");
    }
    let dir = tempfile::tempdir()?;
    let mut domain = bench_domain::BenchDomain::start(dir.path(), hosts).await?;
    let admin = domain.client(true);
    domain.wait_primary(1, Duration::from_secs(30)).await?;
    let licenses = clients.iter().copied().max().unwrap_or(32).max(64) as u32;
    admin
        .import_key(domain.key(licenses)?.to_json_pretty())
        .await?;
    println!("domain of {hosts} hosts (separate processes), primary: host 1");
    println!(
        "{:<10} {:>8} {:>12} {:>9} {:>9} {:>8} {:>8}",
        "target", "clients", "cycles/s", "p50 ms", "p99 ms", "errors", "ratio"
    );
    // The baseline in the same run: a three-member etcd cluster doing the same cycles.
    let etcd = if crate::bench_etcd::available() {
        Some(crate::bench_etcd::EtcdCluster::start(dir.path(), 3).await?)
    } else {
        println!("(etcd not found: apt-get install etcd-server for the baseline; ratios are 1.0)");
        None
    };
    for &n in clients {
        if n == 0 || n > 4096 {
            anyhow::bail!("clients must be 1 to 4096");
        }
        let duration = Duration::from_secs(seconds);
        let baseline = match &etcd {
            Some(etcd) => {
                let result = etcd.drive(n, duration).await?;
                crate::bench::print_row("etcd-3", n, &result, 1.0);
                Some(result.cycles_per_s())
            }
            None => None,
        };
        let cpu_before = domain.cpu_time();
        let result = crate::bench::drive(domain.addr(1), n, duration).await?;
        let cpu_used = domain
            .cpu_time()
            .zip(cpu_before)
            .and_then(|(after, before)| after.checked_sub(before));
        let ratio = baseline.map_or(1.0, |b| result.cycles_per_s() / b);
        crate::bench::print_row("domain", n, &result, ratio);
        if let Some(cpu) = cpu_used.filter(|_| result.cycles() > 0) {
            println!(
                "           the {hosts} hosts used {:.2} cores: {:.0} µs of CPU per cycle",
                cpu.as_secs_f64() / duration.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / result.cycles() as f64
            );
        }
    }
    drop(etcd);
    let (gap, checkouts_after) = failover_gap(&mut domain).await?;
    let new_primary = domain.client(false).domain_status().await?.primary;
    println!(
        "failover gap after kill -9 of the primary: {:.0} ms (new primary: host {}; {} checkouts after the kill)",
        gap.as_secs_f64() * 1000.0,
        new_primary.map_or("?".into(), |p| p.to_string()),
        checkouts_after
    );
    Ok(())
}

/// Stations using the failover client over every host run checkout+checkin; host 1 is
/// killed with SIGKILL after 2 s; returns the longest time without any successful checkout
/// around the kill, and the checkouts after it.
async fn failover_gap(
    domain: &mut bench_domain::BenchDomain,
) -> anyhow::Result<(std::time::Duration, usize)> {
    use std::time::{Duration, Instant};
    let stations = 8;
    let stop_at = Instant::now() + Duration::from_secs(6);
    let successes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let mut tasks = Vec::new();
    for station in 0..stations {
        let client = domain.client(false);
        let successes = successes.clone();
        tasks.push(tokio::spawn(async move {
            let request = tessera_api::CheckoutRequest {
                component: "bench".into(),
                station: format!("failover-{station}"),
                user: "bench".into(),
                host: "bench".into(),
                nonce: String::new(),
                holder_key: String::new(),
                borrow_hours: 0,
            };
            while Instant::now() < stop_at {
                if let Ok((lease, _)) = client.checkout(&request).await {
                    successes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now());
                    let _ = client.checkin(&lease.lease_id).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    domain.kill_9(1)?;
    for task in tasks {
        task.await?;
    }
    let mut times = successes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    times.sort();
    let before = times.iter().rev().find(|t| **t <= killed_at).copied();
    let after: Vec<Instant> = times.iter().filter(|t| **t > killed_at).copied().collect();
    let Some(first_after) = after.first().copied() else {
        anyhow::bail!("no checkout succeeded after the primary was killed");
    };
    let mut gap = first_after - before.unwrap_or(killed_at);
    for pair in after.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    Ok((gap, after.len()))
}

/// `tessera bench --pair`: a redundant pair of `tessera server` processes on loopback:
/// cycles/s through the pair, the failover gap after kill -9 of the primary, and how many
/// licenses the backup still issues alone (its share of the free licenses).
pub async fn bench_pair(clients: &[usize], seconds: u64) -> anyhow::Result<()> {
    use std::time::Duration;

    if seconds == 0 || seconds > 600 {
        anyhow::bail!("--seconds must be 1 to 600");
    }
    let dir = tempfile::tempdir()?;
    let mut pair = bench_domain::BenchDomain::start_pair(dir.path()).await?;
    let primary = Client::new(&format!("http://{}", pair.addr(1)), pair.token());
    primary.pair_enable(&pair.addr(2).to_string(), None).await?;
    for host in [1, 2] {
        pair.wait_pair_status(host, "Paired and Available", Duration::from_secs(30))
            .await?;
    }
    // Throughput uses a key large enough for every client; capacity alone uses a small
    // key of its own on another component.
    let licenses: u32 = 64;
    let admin = pair.client(true);
    admin.import_key(pair.key(8192)?.to_json_pretty()).await?;
    admin
        .import_key(
            pair.key_for("CAPACITY", "capacity", licenses)?
                .to_json_pretty(),
        )
        .await?;
    println!("redundant pair (two processes), primary: host 1, backup share 50%");
    println!(
        "{:<10} {:>8} {:>12} {:>9} {:>9} {:>8} {:>8}",
        "target", "clients", "cycles/s", "p50 ms", "p99 ms", "errors", "ratio"
    );
    for &n in clients {
        if n == 0 || n > 4096 {
            anyhow::bail!("clients must be 1 to 4096");
        }
        // Baseline: one single server (in this process), same key size, same run.
        let baseline = {
            let dir = tempfile::tempdir()?;
            let server =
                crate::bench::start_real(dir.path(), 8192, Duration::from_secs(120)).await?;
            let result = crate::bench::drive(server.addr, n, Duration::from_secs(seconds)).await?;
            server.shutdown().await;
            result
        };
        crate::bench::print_row("single", n, &baseline, 1.0);
        let result = crate::bench::drive(pair.addr(1), n, Duration::from_secs(seconds)).await?;
        crate::bench::print_row(
            "pair",
            n,
            &result,
            result.cycles_per_s() / baseline.cycles_per_s(),
        );
    }
    let (gap, checkouts_after) = failover_gap(&mut pair).await?;
    println!(
        "failover gap after kill -9 of the primary: {:.0} ms ({checkouts_after} checkouts on the backup alone after the kill)",
        gap.as_secs_f64() * 1000.0
    );
    // Capacity alone: new stations ask the backup until it refuses.
    pair.wait_pair_status(2, "Primary not available", Duration::from_secs(10))
        .await?;
    let backup = Client::new(&format!("http://{}", pair.addr(2)), None);
    let mut granted = 0u32;
    for n in 0..licenses + 8 {
        let request = tessera_api::CheckoutRequest {
            component: "capacity".into(),
            station: format!("capacity-{n}"),
            user: "bench".into(),
            host: "bench".into(),
            nonce: String::new(),
            holder_key: String::new(),
            borrow_hours: 0,
        };
        match backup.checkout(&request).await {
            Ok(_) => granted += 1,
            Err(tessera_client::ClientError::Api { code, .. })
                if code == "no_licenses_available" =>
            {
                break;
            }
            Err(error) => return Err(error.into()),
        }
    }
    let status = backup.status().await?;
    let held = status
        .leases
        .iter()
        .filter(|lease| lease.key_id == "CAPACITY")
        .count();
    let share = licenses / 2;
    println!(
        "capacity alone: the backup issued {granted} more leases and holds {held} of the key's {licenses} licenses (its share: {share}; ratio to the share {:.2}); within its share: {}",
        held as f64 / f64::from(share),
        held <= share as usize
    );
    Ok(())
}

mod bench_domain {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;
    use std::time::Instant;

    use jiff::{Timestamp, ToSpan};
    use tessera_client::Client;
    use tessera_core::{LicenseKey, LicenseKeyPayload, SecretKey};

    pub struct BenchDomain {
        root: PathBuf,
        addrs: Vec<SocketAddr>,
        children: Vec<Option<Child>>,
        vendor: SecretKey,
    }

    impl Drop for BenchDomain {
        fn drop(&mut self) {
            for child in self.children.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl BenchDomain {
        pub async fn start(root: &Path, hosts: usize) -> anyhow::Result<BenchDomain> {
            BenchDomain::start_with(root, hosts, false).await
        }

        /// Two hosts for a redundant pair: host 1 a single server with the secret, host 2
        /// joining (then `pair enable`).
        pub async fn start_pair(root: &Path) -> anyhow::Result<BenchDomain> {
            BenchDomain::start_with(root, 2, true).await
        }

        async fn start_with(root: &Path, hosts: usize, pair: bool) -> anyhow::Result<BenchDomain> {
            let vendor = SecretKey::from_seed(tessera_server::ids::random_bytes()?);
            std::fs::write(root.join("vendor.pub"), vendor.public_key().to_file_text())?;
            let listeners: Vec<std::net::TcpListener> = (0..hosts)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()?;
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|l| l.local_addr())
                .collect::<Result<_, _>>()?;
            drop(listeners);
            let secret = hex::encode(tessera_server::ids::random_bytes()?);
            let list: Vec<String> = addrs
                .iter()
                .enumerate()
                .map(|(i, a)| format!("\"{}={a}\"", i + 1))
                .collect();
            for (i, addr) in addrs.iter().enumerate() {
                let host = i + 1;
                let domain = match (pair, host) {
                    (true, 1) => format!("hosts = [{}]", list[0]),
                    (true, _) => format!("hosts = [{}]\njoin = true", list.join(", ")),
                    (false, _) => format!("hosts = [{}]", list.join(", ")),
                };
                std::fs::write(
                    root.join(format!("host-{host}.toml")),
                    format!(
                        "data = \"data-{host}\"\nlisten = \"{addr}\"\ntrust = [\"vendor.pub\"]\nlease_ttl = \"2m\"\ndomain_secret = \"{secret}\"\n\n[domain]\nhost = {host}\n{domain}\n"
                    ),
                )?;
            }
            let mut domain = BenchDomain {
                root: root.to_path_buf(),
                addrs,
                children: Vec::new(),
                vendor,
            };
            domain.children.push(Some(domain.spawn(1)?));
            for host in 2..=hosts {
                let data = root.join(format!("data-{host}"));
                std::fs::create_dir_all(&data)?;
                for file in ["server.key", "server.pub", "admin.token"] {
                    std::fs::copy(root.join("data-1").join(file), data.join(file))?;
                }
                domain.children.push(Some(domain.spawn(host)?));
            }
            Ok(domain)
        }

        fn spawn(&self, host: usize) -> anyhow::Result<Child> {
            let mut child = Command::new(std::env::current_exe()?)
                .args(["server", "--config"])
                .arg(self.root.join(format!("host-{host}.toml")))
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let mut stdout = BufReader::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
            );
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            if !line.starts_with("Tessera license server on ") {
                anyhow::bail!("host {host} did not start: {line:?}");
            }
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            Ok(child)
        }

        /// CPU time the running hosts have used so far (`None` without procfs).
        pub fn cpu_time(&self) -> Option<Duration> {
            self.children
                .iter()
                .flatten()
                .map(|child| crate::bench::cpu_time(child.id()))
                .sum()
        }

        pub fn addr(&self, host: usize) -> SocketAddr {
            self.addrs[host - 1]
        }

        pub fn token(&self) -> Option<String> {
            std::fs::read_to_string(self.root.join("data-1").join("admin.token"))
                .ok()
                .map(|t| t.trim().to_string())
        }

        /// Waits until the host reports this pair status.
        pub async fn wait_pair_status(
            &self,
            host: usize,
            status: &str,
            timeout: Duration,
        ) -> anyhow::Result<()> {
            let deadline = Instant::now() + timeout;
            let client = Client::new(&format!("http://{}", self.addr(host)), None);
            loop {
                let seen = client.pair_status().await.ok();
                if seen.as_ref().is_some_and(|s| s["pair_status"] == status) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "host {host} did not reach pair status {status:?} within {timeout:?} (last: {seen:?})"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        pub fn client(&self, admin: bool) -> Client {
            let urls: Vec<String> = self.addrs.iter().map(|a| format!("http://{a}")).collect();
            let token = admin
                .then(|| std::fs::read_to_string(self.root.join("data-1").join("admin.token")).ok())
                .flatten()
                .map(|t| t.trim().to_string());
            Client::new(&urls.join(","), token)
        }

        pub async fn wait_primary(&self, host: u64, timeout: Duration) -> anyhow::Result<()> {
            let deadline = tokio::time::Instant::now() + timeout;
            let client = self.client(false);
            loop {
                if let Ok(status) = client.domain_status().await
                    && status.primary == Some(host)
                    && status.quorum
                {
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("host {host} did not become primary within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        pub fn key(&self, licenses: u32) -> anyhow::Result<LicenseKey> {
            self.key_for("BENCH", "bench", licenses)
        }

        /// A key `key_id` for one `component`, valid from an hour ago for ten days.
        pub fn key_for(
            &self,
            key_id: &str,
            component: &str,
            licenses: u32,
        ) -> anyhow::Result<LicenseKey> {
            let now = Timestamp::now();
            Ok(LicenseKey::sign(
                LicenseKeyPayload {
                    key_id: key_id.into(),
                    customer: "bench".into(),
                    components: vec![component.into()],
                    licenses,
                    valid_from: now.checked_sub(1.hour())?,
                    valid_until: now.checked_add(240.hours())?,
                    server_id: None,
                    renews: None,
                    certified_server_required: false,
                    max_borrow_days: 0,
                    grace_minutes: 0,
                    issued_at: now,
                },
                &self.vendor,
            )?)
        }

        pub fn kill_9(&mut self, host: usize) -> anyhow::Result<()> {
            if let Some(mut child) = self.children[host - 1].take() {
                child.kill()?; // SIGKILL
                child.wait()?;
            }
            Ok(())
        }
    }
}
