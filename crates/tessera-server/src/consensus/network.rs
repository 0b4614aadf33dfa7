//! openraft's network over HTTP/JSON: each RPC is a POST to `http://{peer}/v1/raft/{rpc}`,
//! answered by [`super::rpc`] with the JSON of `Result<Response, RaftError>`.
//!
//! Error mapping, which drives openraft's retry backoff:
//! - cannot connect, or the peer's Raft has stopped: `Unreachable` (openraft backs off);
//! - timeout, HTTP error status, undecodable body: `NetworkError` (retried at once).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_store::TypeConfig;
use tessera_store::state_machine::SnapshotData;

use super::auth::{AUTH_HEADER, DomainKey, FROM_HEADER};
use super::pair_link::{MODE_HEADER, Mode, PAIR_ALONE_CODE, PairLink};
use super::rpc::SnapshotHeader;

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

/// A TCP connect to a live host on the LAN takes well under this; a dead one should fail
/// fast so the leader backs off instead of holding a replication slot.
const CONNECT_TIMEOUT_MS: u64 = 500;

/// One HTTP POST of a Raft RPC.
pub struct TransportRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// The answer: status, headers (lower-case names), body.
pub struct TransportResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The headers with text values, as (lower-case name, value).
pub fn header_pairs(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect()
}

/// Why a POST got no answer.
#[derive(Debug)]
pub enum TransportError {
    /// No connection (openraft backs off).
    Connect(String),
    /// Timeout, reset, anything else (retried at once).
    Other(String),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Connect(m) => write!(f, "cannot connect: {m}"),
            TransportError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TransportError {}

pub type TransportFuture =
    Pin<Box<dyn Future<Output = Result<TransportResponse, TransportError>> + Send>>;

/// How Raft RPCs travel: real HTTP ([`ReqwestTransport`]) in the server; a simulated network
/// in `tessera-sim --domain` (turmoil).
pub trait RaftTransport: Send + Sync + 'static {
    fn post(&self, request: TransportRequest) -> TransportFuture;
}

/// HTTP/1.1 over TCP with one connection pool.
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl Default for ReqwestTransport {
    fn default() -> ReqwestTransport {
        let client = reqwest::Client::builder()
            // Peers are addressed directly; a proxy from the environment must not intercept.
            .no_proxy()
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ReqwestTransport { client }
    }
}

impl RaftTransport for ReqwestTransport {
    fn post(&self, request: TransportRequest) -> TransportFuture {
        let mut builder = self.client.post(&request.url).timeout(request.timeout);
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let builder = builder.body(request.body);
        Box::pin(async move {
            let response = builder.send().await.map_err(|e| {
                if e.is_connect() {
                    TransportError::Connect(e.to_string())
                } else {
                    TransportError::Other(e.to_string())
                }
            })?;
            let status = response.status().as_u16();
            let headers = header_pairs(response.headers());
            let body = response
                .bytes()
                .await
                .map_err(|e| TransportError::Other(e.to_string()))?
                .to_vec();
            Ok(TransportResponse {
                status,
                headers,
                body,
            })
        })
    }
}

/// Creates one [`HttpPeer`] per target; all share one transport.
pub struct HttpNetwork {
    transport: Arc<dyn RaftTransport>,
    key: Option<DomainKey>,
    from: u64,
    link: Arc<PairLink>,
}

impl HttpNetwork {
    /// `key`: the domain secret every RPC is signed with (none for a single host).
    /// `from`: this host's number, sent along in [`FROM_HEADER`].
    /// `link`: told of every answer (contact with the other host of a pair).
    pub fn new(
        transport: Arc<dyn RaftTransport>,
        key: Option<DomainKey>,
        from: u64,
        link: Arc<PairLink>,
    ) -> HttpNetwork {
        HttpNetwork {
            transport,
            key,
            from,
            link,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> HttpPeer {
        HttpPeer {
            target,
            base_url: format!("http://{}/v1/raft", node.addr),
            transport: self.transport.clone(),
            key: self.key.clone(),
            from: self.from,
            link: self.link.clone(),
        }
    }
}

/// The connection to one peer.
pub struct HttpPeer {
    target: u64,
    base_url: String,
    transport: Arc<dyn RaftTransport>,
    key: Option<DomainKey>,
    from: u64,
    link: Arc<PairLink>,
}

impl HttpPeer {
    async fn post_json<Req, Resp>(
        &self,
        rpc: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = serde_json::to_vec(request).map_err(|e| NetworkError::new(&e))?;
        self.post(rpc, body, "application/json", timeout).await
    }

    async fn post<Resp>(
        &self,
        rpc: &str,
        body: Vec<u8>,
        content_type: &'static str,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
    {
        let url = format!("{}/{rpc}", self.base_url);
        let mut headers = vec![
            (FROM_HEADER, self.from.to_string()),
            (MODE_HEADER, self.link.own_mode().name().to_string()),
            ("content-type", content_type.to_string()),
        ];
        if let Some(key) = &self.key {
            headers.push((AUTH_HEADER, key.sign(rpc, &body)));
        }
        let response = self
            .transport
            .post(TransportRequest {
                url: url.clone(),
                headers,
                body,
                timeout,
            })
            .await
            .map_err(|e| match e {
                TransportError::Connect(_) => RPCError::Unreachable(Unreachable::new(&e)),
                TransportError::Other(_) => RPCError::Network(NetworkError::new(&e)),
            })?;
        let status = response.status;
        if let Some(mode) = response
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(MODE_HEADER))
            .and_then(|(_, value)| Mode::parse(value))
        {
            self.link.peer_mode_seen(mode);
        }
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&response.body);
            if text.contains(PAIR_ALONE_CODE) {
                self.link.peer_alone();
            }
            return Err(RPCError::Network(NetworkError::from_string(format!(
                "HTTP {status} from node {} at {url}: {text}",
                self.target
            ))));
        }
        let answer: Result<Resp, RaftError<TypeConfig>> =
            serde_json::from_slice(&response.body).map_err(|e| NetworkError::new(&e))?;
        self.link.heard();
        // The only error a peer's Raft API returns here is Fatal: that peer has stopped.
        answer.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for HttpPeer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post_json("append", &rpc, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post_json("vote", &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post_json("pre-vote", &rpc, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // Body: one JSON line (vote, meta), then the snapshot bytes as stored, so a large
        // ledger is not re-encoded into a JSON array of numbers.
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let mut body = serde_json::to_vec(&header).map_err(|e| NetworkError::new(&e))?;
        body.push(b'\n');
        body.extend_from_slice(&snapshot.snapshot);
        let send = self.post(
            "snapshot",
            body,
            "application/octet-stream",
            option.hard_ttl(),
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => Ok(result?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.post_json("transfer-leader", &req, option.soft_ttl())
            .await
    }
}
