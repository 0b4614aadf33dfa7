//! The Tessera SDK for Python: `tessera.Client(vendor_public_key=..., servers=[...])`,
//! `client.checkout(component)` giving a `Lease` (a context manager, heartbeated in the
//! background), `client.borrow(component, hours)` for a license held offline, and
//! `tessera.TesseraError` carrying the server's code. Built on the blocking Rust client
//! (`tessera_client::blocking`): every lease is checked against the vendor's public key.
//! Calls release the GIL while they wait on the network. Type hints: `tessera.pyi`.

use std::sync::{Arc, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tessera_client::blocking::{Held, LeaseEvents};
use tessera_client::{BorrowStore, ClientError, GuardEvent};
use tessera_core::PublicKey;

create_exception!(tessera, TesseraError, PyException);

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
        ClientError::Invalid { .. } => "invalid_argument",
        other => other.code().unwrap_or("error"),
    };
    error(code, e.to_string())
}

/// Checks out licenses from Tessera servers, for one vendor.
#[pyclass(module = "tessera")]
struct Client {
    client: Arc<tessera_client::blocking::Client>,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (vendor_public_key, servers = None, borrow_dir = None))]
    fn new(
        vendor_public_key: &str,
        servers: Option<&Bound<'_, PyAny>>,
        borrow_dir: Option<String>,
    ) -> PyResult<Client> {
        let root = PublicKey::from_base64(vendor_public_key.trim())
            .map_err(|e| error("invalid_argument", format!("vendor_public_key: {e}")))?;
        let servers: Option<String> = match servers {
            None => None,
            Some(value) => Some(match value.extract::<String>() {
                Ok(one) => one,
                Err(_) => value.extract::<Vec<String>>()?.join(","),
            }),
        };
        let client = tessera_client::blocking::Client::new(root, servers.as_deref())
            .map_err(|e| error("invalid_argument", e.to_string()))?;
        let client = match borrow_dir {
            Some(dir) => client.with_borrow_store(Some(BorrowStore::new(dir))),
            None => client,
        };
        Ok(Client {
            client: Arc::new(client),
        })
    }

    /// Checks out a license of `component` for this machine (a borrowing kept here answers
    /// instead, while it holds); with `wait=True`, waits (up to 60 s) for one to come free.
    /// `on_event(kind, message)` hears "reconnecting", "reconnected" and "lost" from the
    /// heartbeat thread. Raises `TesseraError` with the server's code, or `lease_untrusted`
    /// when the answer does not check out against the vendor's key.
    #[pyo3(signature = (component, wait = false, on_event = None))]
    fn checkout(
        &self,
        py: Python<'_>,
        component: &str,
        wait: bool,
        on_event: Option<PyObject>,
    ) -> PyResult<Lease> {
        let events: Option<LeaseEvents> = on_event.map(|callback| {
            let events = move |_: &str, event: &GuardEvent| {
                let (kind, message) = match event {
                    GuardEvent::Reconnecting { error } => ("reconnecting", error.clone()),
                    GuardEvent::Reconnected => ("reconnected", String::new()),
                    GuardEvent::Lost { reason } => ("lost", reason.clone()),
                };
                Python::with_gil(|py| {
                    if let Err(raised) = callback.call1(py, (kind, message)) {
                        raised.print(py);
                    }
                });
            };
            Arc::new(events) as LeaseEvents
        });
        let client = self.client.clone();
        let component = component.to_string();
        let held = py
            .allow_threads(move || client.checkout(&component, wait, events))
            .map_err(|e| client_error(&e))?;
        Ok(Lease::new(held))
    }

    /// Borrows a license of `component` for `hours` (up to the key's max_borrow_days) and
    /// keeps it on this machine: `checkout(component)` answers with it, offline, until it
    /// ends; `lease.checkin()` returns it early.
    fn borrow(&self, py: Python<'_>, component: &str, hours: u32) -> PyResult<Lease> {
        let client = self.client.clone();
        let component = component.to_string();
        let held = py
            .allow_threads(move || client.borrow(&component, hours))
            .map_err(|e| client_error(&e))?;
        Ok(Lease::new(held))
    }
}

/// A license held: heartbeated in the background until checked in, or a borrowing.
#[pyclass(module = "tessera")]
struct Lease {
    held: Mutex<Option<Held>>,
    #[pyo3(get)]
    lease_id: String,
    #[pyo3(get)]
    component: String,
    #[pyo3(get)]
    key_id: String,
    #[pyo3(get)]
    borrowed: bool,
}

impl Lease {
    fn new(held: Held) -> Lease {
        let lease = held.lease();
        Lease {
            lease_id: lease.lease_id,
            component: lease.component,
            key_id: lease.key_id,
            borrowed: held.is_borrowed(),
            held: Mutex::new(Some(held)),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Lease {
    /// A lease dropped without `checkin()` is checked in, without the GIL: the SDK's thread
    /// may be waiting for it to call `on_event`.
    fn drop(&mut self) {
        let held = self.held().take();
        if let Some(held) = held {
            Python::with_gil(|py| py.allow_threads(move || drop(held)));
        }
    }
}

#[pymethods]
impl Lease {
    /// When the lease ends unless renewed (a borrowing: its end), RFC 3339.
    #[getter]
    fn expires_at(&self) -> Option<String> {
        self.held()
            .as_ref()
            .map(|held| held.lease().expires_at.to_string())
    }

    /// Why the license was lost (or the borrowing ended), or None while it is held.
    #[getter]
    fn lost(&self) -> Option<String> {
        self.held().as_ref().and_then(Held::lost)
    }

    /// Stops the heartbeat and returns the license, or returns a borrowing early (again:
    /// nothing happens).
    fn checkin(&self, py: Python<'_>) -> PyResult<()> {
        let held = self.held().take();
        let Some(held) = held else {
            return Ok(());
        };
        py.allow_threads(move || held.checkin())
            .map_err(|e| client_error(&e))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Leaving the `with` block checks a lease in; a borrowing is kept (that is what it is
    /// for: return it with `checkin()`).
    #[pyo3(signature = (_exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<PyObject>,
        _exc: Option<PyObject>,
        _tb: Option<PyObject>,
    ) -> PyResult<bool> {
        if !self.borrowed {
            self.checkin(py)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let kind = if self.borrowed { "borrowed " } else { "" };
        format!(
            "<tessera.Lease {kind}{} of {} (key {})>",
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
