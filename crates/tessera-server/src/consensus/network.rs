//! openraft's network over HTTP/JSON: each RPC is a POST to `{scheme}://{peer}/v1/raft/{rpc}`
//! (`https` when the hosts serve HTTPS), answered by [`super::rpc`] with the JSON of `Result<Response, RaftError>`.
//!
//! Error mapping, which drives openraft's retry backoff:
//! - cannot connect, or the peer's Raft has stopped: `Unreachable` (openraft backs off);
//! - timeout, HTTP error status, undecodable body: `NetworkError` (retried at once).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

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
use tessera_tls::PeerStream;
use tokio::net::TcpStream;

use super::auth::{AUTH_HEADER, DomainKey, FROM_HEADER, LENGTH_HEADER};
use super::pair_link::{MODE_HEADER, Mode, PAIR_ALONE_CODE, PairLink};
use super::rpc::SnapshotHeader;

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

/// A TCP connect to a live host on the LAN takes well under this; a dead one should fail
/// fast so the leader backs off instead of holding a replication slot.
const CONNECT_TIMEOUT_MS: u64 = 500;
/// A TLS handshake with a live peer on the LAN: a round trip or two and one signature.
const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 1_000;

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

impl TransportResponse {
    /// The answer of an HTTP response's head and its whole body; of the headers, those with
    /// text values.
    pub fn new(head: &axum::http::response::Parts, body: Vec<u8>) -> TransportResponse {
        let headers = head
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        TransportResponse {
            status: head.status.as_u16(),
            headers,
            body,
        }
    }
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

/// How Raft RPCs travel: real HTTP ([`PeerTransport`]) in the server; a simulated network
/// in `tessera-sim --domain` (turmoil).
pub trait RaftTransport: Send + Sync + 'static {
    fn post(&self, request: TransportRequest) -> TransportFuture;
}

/// Idle connections kept per peer; openraft rarely has more than two RPCs to one peer at once
/// (replication and a vote or a snapshot).
const IDLE_PER_PEER_MAX: usize = 4;
/// Idle connections older than this are closed (a removed host's, say); replication and
/// heartbeats use the others every few hundred milliseconds.
const IDLE_MAX: Duration = Duration::from_secs(60);
/// A request body up to this size is sent again on a new connection when a kept-alive one
/// fails before any answer; a larger one (a snapshot) is not.
const RETRY_BODY_BYTES_MAX: usize = 1 << 20;

/// HTTP/1.1 over keep-alive TCP (or TLS) connections (hyper's client connection), each
/// driven by the task that sends the RPC instead of a connection task of its own: a request
/// and its answer cost no hand-off between tasks, which on a busy leader was a queue wait
/// per RPC.
#[derive(Default)]
pub struct PeerTransport {
    /// Idle connections by `scheme://host:port`.
    idle: Arc<Mutex<HashMap<String, Vec<PeerConnection>>>>,
    /// For `https://` peers: whom to trust, and this host's certificate (mutual TLS).
    tls: Option<tessera_tls::tokio_rustls::TlsConnector>,
}

impl PeerTransport {
    /// A transport reaching `https://` peers with `tls` (and `http://` ones in clear).
    pub fn new(tls: Option<Arc<tessera_tls::rustls::ClientConfig>>) -> PeerTransport {
        PeerTransport {
            idle: Arc::default(),
            tls: tls.map(tessera_tls::tokio_rustls::TlsConnector::from),
        }
    }
}

type Connection = hyper::client::conn::http1::Connection<TokioIo<PeerStream>, Full<Bytes>>;

/// One keep-alive connection to a peer, idle between RPCs.
struct PeerConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    connection: Pin<Box<Connection>>,
    /// The connection future has completed and must not be polled again.
    ended: bool,
    /// Since when it waits in the idle pool.
    idle_since: std::time::Instant,
}

impl PeerConnection {
    async fn open(
        authority: &str,
        tls: Option<&tessera_tls::tokio_rustls::TlsConnector>,
    ) -> Result<PeerConnection, TransportError> {
        let connect = TcpStream::connect(authority);
        let stream = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect)
            .await
            .map_err(|_| {
                TransportError::Connect(format!(
                    "no connection to {authority} within {CONNECT_TIMEOUT_MS} ms"
                ))
            })?
            .map_err(|e| TransportError::Connect(format!("{authority}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let stream = match tls {
            None => PeerStream::Plain(stream),
            Some(connector) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority, |(host, _)| host);
                let handshake = PeerStream::tls(connector, host, stream);
                tokio::time::timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS), handshake)
                    .await
                    .map_err(|_| {
                        TransportError::Connect(format!(
                            "no TLS handshake with {authority} within {TLS_HANDSHAKE_TIMEOUT_MS} ms"
                        ))
                    })?
                    .map_err(|e| TransportError::Connect(format!("{authority}: TLS: {e}")))?
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TransportError::Connect(format!("{authority}: {e}")))?;
        Ok(PeerConnection {
            sender,
            connection: Box::pin(connection),
            ended: false,
            idle_since: std::time::Instant::now(),
        })
    }

    /// Whether the peer closed the connection while it was idle (polls it once, without
    /// waiting).
    fn is_closed(&mut self) -> bool {
        if self.ended || self.sender.is_closed() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.ended = self.connection.as_mut().poll(&mut cx).is_ready();
        self.ended
    }

    /// Sends the request and reads the answer. On failure, also tells whether it came before
    /// any answer arrived (then the request may be sent again on another connection).
    async fn exchange(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<TransportResponse, (TransportError, bool)> {
        let before_answer = |e: TransportError| (e, true);
        let after_answer = |e: TransportError| (e, false);
        let other = |e: &dyn std::fmt::Display| TransportError::Other(e.to_string());
        let mut builder = hyper::Request::post(path).header(hyper::header::HOST, authority);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(|e| after_answer(other(&e)))?;
        let (connection, ended) = (&mut self.connection, &mut self.ended);
        drive(connection, ended, self.sender.ready())
            .await
            .map_err(before_answer)?
            .map_err(|e| before_answer(other(&e)))?;
        let send = self.sender.send_request(http_request);
        let response = drive(connection, ended, send)
            .await
            .map_err(before_answer)?
            .map_err(|e| before_answer(other(&e)))?;
        let (head, body) = response.into_parts();
        let body = drive(connection, ended, body.collect())
            .await
            .map_err(after_answer)?
            .map_err(|e| after_answer(other(&e)))?
            .to_bytes()
            .to_vec();
        Ok(TransportResponse::new(&head, body))
    }
}

/// Runs `work` (which needs the connection's I/O) while driving the connection. The
/// connection ending first, even cleanly, is an error: the answer is lost.
async fn drive<F: Future>(
    connection: &mut Pin<Box<Connection>>,
    ended: &mut bool,
    work: F,
) -> Result<F::Output, TransportError> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        let state = if *ended {
            Poll::Ready(Ok(()))
        } else {
            connection.as_mut().poll(cx)
        };
        *ended |= state.is_ready();
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match state {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Err(TransportError::Other(
                "the peer closed the connection before answering".into(),
            ))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(TransportError::Other(e.to_string()))),
        }
    })
    .await
}

/// A URL's parts: whether it is `https`, `host:port`, `/path`.
struct Target {
    tls: bool,
    authority: String,
    path: String,
}

impl Target {
    /// The idle pool's key: a clear and a TLS connection to one address are not the same.
    fn pool_key(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// `http://host:port/path` or `https://…` as its parts.
fn split_url(url: &str) -> Result<Target, TransportError> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(TransportError::Connect(format!(
            "{url}: peers are reached over http:// or https://"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    Ok(Target {
        tls,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

impl PeerTransport {
    fn take_idle(&self, authority: &str) -> Option<PeerConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let connections = idle.get_mut(authority)?;
        while let Some(mut connection) = connections.pop() {
            if !connection.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    fn put_idle(
        idle: &Mutex<HashMap<String, Vec<PeerConnection>>>,
        authority: String,
        mut connection: PeerConnection,
    ) {
        let now = std::time::Instant::now();
        connection.idle_since = now;
        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, connections| {
            connections.retain(|c| now.duration_since(c.idle_since) < IDLE_MAX);
            !connections.is_empty()
        });
        let connections = idle.entry(authority).or_default();
        if connections.len() < IDLE_PER_PEER_MAX {
            connections.push(connection);
        }
    }
}

impl RaftTransport for PeerTransport {
    fn post(&self, request: TransportRequest) -> TransportFuture {
        let split = split_url(&request.url);
        let reused = split
            .as_ref()
            .ok()
            .and_then(|target| self.take_idle(&target.pool_key()));
        let idle = self.idle.clone();
        let connector = self.tls.clone();
        Box::pin(async move {
            let target = split?;
            let pool_key = target.pool_key();
            let Target {
                tls,
                authority,
                path,
                ..
            } = target;
            let connector = match (tls, connector) {
                (false, _) => None,
                (true, Some(connector)) => Some(connector),
                (true, None) => {
                    return Err(TransportError::Connect(format!(
                        "{authority}: an https:// peer, but this host has no TLS configured"
                    )));
                }
            };
            let body = Bytes::from(request.body);
            let headers = request.headers;
            let exchange = async {
                if let Some(mut connection) = reused {
                    match connection
                        .exchange(&authority, &path, &headers, body.clone())
                        .await
                    {
                        Ok(response) => return Ok((response, connection)),
                        // A kept-alive connection the peer has just closed fails before any
                        // answer: the RPC goes once more on a new connection. (Raft RPCs may
                        // be repeated; only a snapshot's large body is not sent twice.)
                        Err((e, true)) if body.len() <= RETRY_BODY_BYTES_MAX => {
                            tracing::debug!(%authority, error = %e, "kept-alive connection failed; retrying on a new one");
                        }
                        Err((e, _)) => return Err(e),
                    }
                }
                let mut connection = PeerConnection::open(&authority, connector.as_ref()).await?;
                let response = connection
                    .exchange(&authority, &path, &headers, body)
                    .await
                    .map_err(|(e, _)| e)?;
                Ok((response, connection))
            };
            let timeout = request.timeout;
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok((response, connection))) => {
                    if !connection.ended {
                        PeerTransport::put_idle(&idle, pool_key, connection);
                    }
                    Ok(response)
                }
                // A failed connection is dropped: it may hold half a request or answer.
                Ok(Err(e)) => Err(e),
                Err(_) => Err(TransportError::Other(format!(
                    "no answer from {authority} within {} ms",
                    timeout.as_millis()
                ))),
            }
        })
    }
}

/// Creates one [`HttpPeer`] per target; all share one transport.
pub struct HttpNetwork {
    transport: Arc<dyn RaftTransport>,
    /// `http` or `https`.
    scheme: &'static str,
    key: Option<DomainKey>,
    from: u64,
    link: Arc<PairLink>,
}

impl HttpNetwork {
    /// `scheme`: `http` or `https`, how every peer is reached.
    /// `key`: the domain secret every RPC is signed with (none for a single host).
    /// `from`: this host's number, sent along in [`FROM_HEADER`].
    /// `link`: told of every answer (contact with the other host of a pair).
    pub fn new(
        transport: Arc<dyn RaftTransport>,
        scheme: &'static str,
        key: Option<DomainKey>,
        from: u64,
        link: Arc<PairLink>,
    ) -> HttpNetwork {
        HttpNetwork {
            transport,
            scheme,
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
            base_url: format!("{}://{}/v1/raft", self.scheme, node.addr),
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
            headers.push((LENGTH_HEADER, key.sign_length(rpc, body.len() as u64)));
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A peer on a loopback port that answers the requests of each connection with `replies`
    /// in turn, then closes it; it counts the connections it accepted.
    async fn peer(replies: &'static [&'static [u8]]) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    for reply in replies {
                        // Headers, then the 2-byte body the tests send.
                        seen.clear();
                        while !seen.ends_with(b"{}") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    // Dropping the stream closes the connection, without saying so before.
                });
            }
        });
        (addr.to_string(), accepted)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    /// Headers promising 10 bytes, then 2 of them.
    const BROKEN_OFF: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok";

    fn request(authority: &str) -> TransportRequest {
        TransportRequest {
            url: format!("http://{authority}/v1/raft/append"),
            headers: vec![("content-type", "application/json".into())],
            body: b"{}".to_vec(),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_while_idle_is_replaced_not_reused() {
        // One answer per connection, then the peer closes it, as a restarted or
        // idle-timing-out host would.
        let (authority, accepted) = peer(&[OK]).await;
        let transport = PeerTransport::default();
        for round in 1..=3 {
            let response = transport.post(request(&authority)).await.unwrap();
            assert_eq!(response.status, 200);
            assert_eq!(response.body, b"ok");
            // Each answer came on a fresh connection: the closed one was noticed before reuse,
            // or its reuse failed and the request went again on a new one.
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_request_whose_answer_broke_off_is_not_sent_again() {
        let (authority, accepted) = peer(&[OK, BROKEN_OFF]).await;
        let transport = PeerTransport::default();
        let first = transport.post(request(&authority)).await.unwrap();
        assert_eq!(first.body, b"ok");
        // The peer may have acted on it: an error, not a second delivery.
        assert!(matches!(
            transport.post(request(&authority)).await,
            Err(TransportError::Other(_))
        ));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_peer_that_is_not_listening_is_unreachable_and_a_bad_url_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        drop(listener);
        let transport = PeerTransport::default();
        match transport.post(request(&authority)).await {
            Err(TransportError::Connect(message)) => assert!(message.contains(&authority)),
            other => panic!(
                "expected a connect error, got {:?}",
                other.map(|r| r.status)
            ),
        }
        let mut bad = request(&authority);
        bad.url = format!("ftp://{authority}/v1/raft/append");
        match transport.post(bad).await {
            Err(TransportError::Connect(message)) => assert!(message.contains("https://")),
            other => panic!("expected a refusal, got {:?}", other.map(|r| r.status)),
        }
        // An https:// peer needs this host's TLS settings.
        let mut tls = request(&authority);
        tls.url = format!("https://{authority}/v1/raft/append");
        match transport.post(tls).await {
            Err(TransportError::Connect(message)) => assert!(message.contains("no TLS")),
            other => panic!("expected a refusal, got {:?}", other.map(|r| r.status)),
        }
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        let target = split_url("http://127.0.0.1:7400/v1/raft/vote").unwrap();
        assert_eq!(
            (target.tls, target.authority.as_str(), target.path.as_str()),
            (false, "127.0.0.1:7400", "/v1/raft/vote")
        );
        let target = split_url("https://host:1").unwrap();
        assert_eq!(
            (target.tls, target.authority.as_str(), target.path.as_str()),
            (true, "host:1", "/")
        );
        assert_eq!(target.pool_key(), "https://host:1");
    }
}
