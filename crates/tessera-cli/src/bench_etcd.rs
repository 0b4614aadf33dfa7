//! The etcd baseline for `tessera bench --domain N`: a three-member etcd cluster (Debian's
//! `etcd-server`, run as separate processes on loopback) used as a license semaphore, driven
//! by the same closed-loop clients in the same run.
//!
//! One cycle is what a station does with Tessera: a checkout, a transaction that takes the
//! station's seat key only if it is free (`compare version == 0`, then `put`), and a checkin,
//! a delete of that key. Both are linearizable writes through etcd's Raft log, sent as JSON to
//! etcd's HTTP gateway (`/v3/kv/txn`, `/v3/kv/deleterange`), over one keep-alive connection
//! per client to the leader, like the Tessera clients.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::net::TcpStream;

use crate::bench::RunResult;

/// Upper bound on cycles per client per run, so a loop can never run away.
const CYCLES_PER_CLIENT_MAX: usize = 10_000_000;

/// A running etcd cluster; its processes are killed on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    clients: Vec<SocketAddr>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether an `etcd` binary is on the PATH.
pub fn available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl EtcdCluster {
    /// Starts `members` etcd processes in `dir` on free loopback ports and waits until the
    /// cluster answers writes.
    pub async fn start(dir: &Path, members: usize) -> anyhow::Result<EtcdCluster> {
        let mut ports = Vec::new();
        for _ in 0..members {
            let client = std::net::TcpListener::bind("127.0.0.1:0")?;
            let peer = std::net::TcpListener::bind("127.0.0.1:0")?;
            ports.push((client.local_addr()?, peer.local_addr()?));
        }
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            children: Vec::new(),
            clients: ports.iter().map(|(client, _)| *client).collect(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-{i}")))
                .arg("--listen-client-urls")
                .arg(format!("http://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting etcd (apt-get install etcd-server)")?;
            cluster.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(leader)) = cluster.leader().await {
                // The leader first: clients talk to it, as Tessera's clients talk to the primary.
                cluster.clients.swap(0, leader);
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not elect a leader within 30 s (logs in {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The index of the member that is leader, if one is.
    async fn leader(&self) -> anyhow::Result<Option<usize>> {
        let mut ids = Vec::new();
        let mut leader = None;
        for addr in &self.clients {
            let status = post_json(*addr, "/v3/maintenance/status", "{}").await?;
            let value: serde_json::Value = serde_json::from_slice(&status)?;
            let member = value["header"]["member_id"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if let Some(l) = value["leader"].as_str() {
                leader = Some(l.to_string());
            }
            ids.push(member);
        }
        Ok(leader.and_then(|l| ids.iter().position(|id| *id == l)))
    }

    /// Runs `clients` closed-loop stations against the leader for `duration`.
    pub async fn drive(&self, clients: usize, duration: Duration) -> anyhow::Result<RunResult> {
        let addr = self.clients[0];
        let started = Instant::now();
        let deadline = started + duration;
        let tasks = (0..clients)
            .map(|client| tokio::spawn(station_loop(addr, client, deadline)))
            .collect();
        crate::bench::collect_runs(tasks, started).await
    }
}

async fn station_loop(
    addr: SocketAddr,
    client: usize,
    deadline: Instant,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let seat = BASE64.encode(format!("seats/bench/{client}"));
    let station = BASE64.encode(format!("bench-{client}"));
    let checkout = serde_json::json!({
        "compare": [{"key": seat, "target": "VERSION", "result": "EQUAL", "version": "0"}],
        "success": [{"requestPut": {"key": seat, "value": station}}],
    })
    .to_string();
    let checkin = serde_json::json!({ "key": seat }).to_string();
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    while Instant::now() < deadline && latencies_us.len() < CYCLES_PER_CLIENT_MAX {
        let cycle_started = Instant::now();
        let taken = send(&mut sender, addr, "/v3/kv/txn", &checkout).await?;
        let answer: serde_json::Value = serde_json::from_slice(&taken)?;
        if answer["succeeded"].as_bool() != Some(true) {
            errors += 1;
        }
        let freed = send(&mut sender, addr, "/v3/kv/deleterange", &checkin).await?;
        let answer: serde_json::Value = serde_json::from_slice(&freed)?;
        if answer["deleted"].as_str() != Some("1") {
            errors += 1;
            continue;
        }
        latencies_us.push(cycle_started.elapsed().as_micros() as u64);
    }
    Ok((latencies_us, errors))
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> anyhow::Result<Bytes> {
    let request = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = sender
        .send_request(request)
        .await
        .context(path.to_string())?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "etcd answered {status} to {path}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(bytes)
}

/// One request on a fresh connection (setup only, not measured).
async fn post_json(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<Bytes> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    send(&mut sender, addr, path, body).await
}
