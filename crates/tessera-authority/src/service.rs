//! Starting and stopping the authority. The caller hands in the listener and the clock, so
//! tests run it on port 0 with a manual clock, exactly as the license server is run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tessera_core::{Clock, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::data_dir::DataDir;
use crate::error::AuthorityError;
use crate::http::{Shared, router};
use crate::store;

pub struct AuthorityConfig {
    /// Holds vendor.key, vendor.pub, admin.token and authority.sqlite; created if missing.
    pub data_dir: PathBuf,
    pub clock: Arc<dyn Clock>,
    /// Serve HTTPS with this certificate chain and key (PEM), reloaded when they change.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The wall clock, for production.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        jiff::Timestamp::now().as_millisecond()
    }
}

pub struct RunningAuthority {
    pub addr: SocketAddr,
    /// The bearer token for the admin API (also in DATA/admin.token).
    pub admin_token: String,
    pub vendor_public_key: PublicKey,
    pub data_dir: PathBuf,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<()>,
    /// Reloads the TLS certificate (HTTPS only).
    tls_watch: Option<JoinHandle<()>>,
}

impl RunningAuthority {
    pub fn url(&self) -> String {
        let scheme = if self.tls_watch.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish (each is one committed transaction or
    /// none), then closes the database.
    pub async fn shutdown(self) {
        if let Some(watch) = self.tls_watch {
            watch.abort();
        }
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
    }
}

/// Opens (or creates) the data directory and the database, then serves on `listener`.
pub async fn start(
    listener: TcpListener,
    config: AuthorityConfig,
) -> Result<RunningAuthority, AuthorityError> {
    let AuthorityConfig {
        data_dir,
        clock,
        tls,
    } = config;
    tessera_tls::install();
    let addr = listener.local_addr().map_err(AuthorityError::Listen)?;
    let tls_failed = |error: tessera_tls::TlsError| {
        AuthorityError::Listen(std::io::Error::other(error.to_string()))
    };
    let tls = match tls {
        Some((cert, key)) => Some(tessera_tls::ServerTls::load(&cert, &key).map_err(tls_failed)?),
        None => None,
    };
    let acceptor = tls
        .as_ref()
        .map(|tls| tls.acceptor())
        .transpose()
        .map_err(tls_failed)?;
    // Key files and migrations are blocking work; keep them off the async threads.
    let (data, database) = tokio::task::spawn_blocking(move || {
        let data = DataDir::open_or_init(&data_dir)?;
        let database = store::open(&data.database_path())?;
        Ok::<_, AuthorityError>((data, database))
    })
    .await
    .map_err(|e| AuthorityError::Internal(format!("start-up task failed: {e}")))??;

    let vendor_public_key = data.vendor.public_key();
    let state = Arc::new(Shared {
        database: Mutex::new(database),
        vendor_pub_text: vendor_public_key.to_file_text(),
        vendor: data.vendor,
        admin_token: data.admin_token.clone(),
        clock,
        secure_cookies: tls.is_some(),
    });
    let app = router(state);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let http = tokio::spawn(async move {
        let signal = async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        };
        let served = match acceptor {
            Some(acceptor) => match tessera_tls::TlsListener::new(listener, acceptor) {
                Ok(listener) => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(signal)
                        .await
                }
                Err(error) => Err(error),
            },
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "authority HTTP server failed");
        }
    });
    let tls_watch = tls.map(|tls| tls.watch(std::time::Duration::from_secs(2)));
    tracing::info!(%addr, vendor_key = %vendor_public_key.fingerprint(), "vendor authority listening");
    Ok(RunningAuthority {
        addr,
        admin_token: data.admin_token,
        vendor_public_key,
        data_dir: data.path,
        shutdown,
        http,
        tls_watch,
    })
}
