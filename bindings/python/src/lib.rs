//! The Tessera SDK for Python: `tessera.Client(vendor_public_key=..., servers=[...])`,
//! `client.checkout(component)` giving a `Lease` (a context manager, heartbeated in the
//! background), and `tessera.TesseraError` carrying the server's code. Every lease is checked
//! against the vendor's public key (`tessera_client::Client::verifying`). Calls release the
//! GIL while they wait on the network. Type hints: `tessera.pyi`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tessera_api::CheckoutRequest;
use tessera_client::{ClientError, LeaseGuard};
use tessera_core::PublicKey;

create_exception!(tessera, TesseraError, PyException);

/// How long `checkout(..., wait=True)` waits for a license, and how often it asks again.
const WAIT_FOR: Duration = Duration::from_secs(60);
const WAIT_EVERY: Duration = Duration::from_secs(2);

fn error(code: &str, message: String) -> PyErr {
    let err = TesseraError::new_err(format!("{code}: {message}"));
    Python::with_gil(|py| {
        let value = err.value(py);
        let _ = value.setattr("code", code);
        let _ = value.setattr("message", message);
    });
    err
}

fn client_error(e: &ClientError) -> PyErr {
    let code = match e {
        ClientError::Transport { .. } => "unreachable",
        ClientError::Decode { .. } => "bad_answer",
        other => other.code().unwrap_or("error"),
    };
    error(code, e.to_string())
}

/// Checks out licenses from Tessera servers, for one vendor.
#[pyclass(module = "tessera")]
struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    client: tessera_client::Client,
    station: String,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (vendor_public_key, servers = None))]
    fn new(vendor_public_key: &str, servers: Option<&Bound<'_, PyAny>>) -> PyResult<Client> {
        let root = PublicKey::from_base64(vendor_public_key.trim())
            .map_err(|e| error("invalid_argument", format!("vendor_public_key: {e}")))?;
        let servers: String = match servers {
            None => std::env::var("TESSERA_SERVER").unwrap_or_default(),
            Some(value) => match value.extract::<String>() {
                Ok(one) => one,
                Err(_) => value.extract::<Vec<String>>()?.join(","),
            },
        };
        if servers.trim().is_empty() {
            return Err(error(
                "invalid_argument",
                "no server: pass servers=[...] or set TESSERA_SERVER".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera")
            .enable_all()
            .build()
            .map_err(|e| error("internal", format!("cannot start the SDK's thread: {e}")))?;
        let station = tessera_client::machine_fingerprint().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown-station".into())
        });
        Ok(Client {
            runtime: Arc::new(runtime),
            client: tessera_client::Client::new(&servers, None).verifying(root),
            station,
        })
    }

    /// Checks out a license of `component` for this machine; with `wait=True`, waits (up to
    /// 60 s) for one to come free. Raises `TesseraError` with the server's code, or
    /// `lease_untrusted` when the answer does not check out against the vendor's key.
    #[pyo3(signature = (component, wait = false))]
    fn checkout(&self, py: Python<'_>, component: &str, wait: bool) -> PyResult<Lease> {
        let request = CheckoutRequest {
            component: component.into(),
            station: self.station.clone(),
            user: std::env::var("USER").unwrap_or_default(),
            host: self.station.clone(),
            nonce: String::new(),
            holder_key: String::new(),
        };
        let client = self.client.clone();
        let runtime = self.runtime.clone();
        let result = py.allow_threads(move || {
            runtime.block_on(async move {
                let deadline = tokio::time::Instant::now() + WAIT_FOR;
                let lease = loop {
                    match client.checkout(&request).await {
                        Err(e)
                            if wait
                                && e.code() == Some("no_licenses_available")
                                && tokio::time::Instant::now() + WAIT_EVERY < deadline =>
                        {
                            tokio::time::sleep(WAIT_EVERY).await;
                        }
                        other => break other.map(|(lease, _)| lease),
                    }
                }?;
                let info = (
                    lease.lease_id.clone(),
                    lease.component.clone(),
                    lease.key_id.clone(),
                    lease.expires_at.to_string(),
                );
                Ok::<_, ClientError>((LeaseGuard::start(client, lease), info))
            })
        });
        let (guard, (lease_id, component, key_id, expires_at)) =
            result.map_err(|e| client_error(&e))?;
        Ok(Lease {
            runtime: self.runtime.clone(),
            guard: Mutex::new(Some(guard)),
            lease_id,
            component,
            key_id,
            expires_at,
        })
    }
}

/// A license held, heartbeated in the background until checked in.
#[pyclass(module = "tessera")]
struct Lease {
    runtime: Arc<tokio::runtime::Runtime>,
    guard: Mutex<Option<LeaseGuard>>,
    #[pyo3(get)]
    lease_id: String,
    #[pyo3(get)]
    component: String,
    #[pyo3(get)]
    key_id: String,
    #[pyo3(get)]
    expires_at: String,
}

#[pymethods]
impl Lease {
    /// Why the lease was lost, or None while it is held.
    #[getter]
    fn lost(&self) -> Option<String> {
        self.guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(LeaseGuard::lost)
    }

    /// Stops the heartbeat and returns the license (again: nothing happens).
    fn checkin(&self, py: Python<'_>) -> PyResult<()> {
        let guard = self.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(guard) = guard else {
            return Ok(());
        };
        let runtime = self.runtime.clone();
        py.allow_threads(move || runtime.block_on(guard.checkin()))
            .map_err(|e| client_error(&e))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (_exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<PyObject>,
        _exc: Option<PyObject>,
        _tb: Option<PyObject>,
    ) -> PyResult<bool> {
        self.checkin(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<tessera.Lease {} of {} (key {})>",
            self.lease_id, self.component, self.key_id
        )
    }
}

#[pymodule]
#[pyo3(name = "tessera")]
fn tessera_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Lease>()?;
    m.add("TesseraError", m.py().get_type::<TesseraError>())?;
    Ok(())
}
