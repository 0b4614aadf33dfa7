//! Rust SDK for Tessera license servers: typed calls over HTTP/JSON.
//!
//! Errors keep the server's stable code (`no_licenses_available`, `lease_not_found`, ...) so
//! callers can branch on it.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tessera_api::{
    AllocateRequest, CheckoutRequest, ErrorBody, Health, KeyImported, KeyRemoved, KeySummary,
    KeyUpdateReport, Lease, Status, SyncStatus, SyncSummary,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a client without TLS always builds");
        Client {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            token,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
    ) -> Result<(StatusCode, String), ClientError> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some((body, content_type)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let transport = |error: reqwest::Error| ClientError::Transport {
            url: url.clone(),
            message: error.to_string(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        if status.is_client_error() || status.is_server_error() {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => ClientError::Api {
                    status: status.as_u16(),
                    code: body.error.code,
                    message: body.error.message,
                },
                Err(_) => ClientError::Api {
                    status: status.as_u16(),
                    code: "http_error".into(),
                    message: format!("HTTP {status}: {text}"),
                },
            });
        }
        Ok((status, text))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, &'static str)>,
    ) -> Result<(StatusCode, T), ClientError> {
        let (status, text) = self.send(method, path, body).await?;
        let value = serde_json::from_str(&text).map_err(|error| ClientError::Decode {
            url: format!("{}{path}", self.base_url),
            message: error.to_string(),
        })?;
        Ok((status, value))
    }

    /// Returns the lease and whether it is new (false: the station already held it).
    pub async fn checkout(&self, request: &CheckoutRequest) -> Result<(Lease, bool), ClientError> {
        let body = serde_json::to_string(request).expect("request serializes");
        let (status, lease) = self
            .json(Method::POST, "/v1/leases", Some((body, "application/json")))
            .await?;
        Ok((lease, status == StatusCode::CREATED))
    }

    pub async fn heartbeat(&self, lease_id: &str) -> Result<Lease, ClientError> {
        let path = format!("/v1/leases/{lease_id}/heartbeat");
        Ok(self.json(Method::POST, &path, None).await?.1)
    }

    pub async fn checkin(&self, lease_id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/v1/leases/{lease_id}"), None)
            .await?;
        Ok(())
    }

    pub async fn force_release(&self, lease_id: &str) -> Result<Lease, ClientError> {
        let path = format!("/v1/leases/{lease_id}/release");
        Ok(self.json(Method::POST, &path, None).await?.1)
    }

    pub async fn import_key(&self, key_file_text: String) -> Result<KeyImported, ClientError> {
        let body = Some((key_file_text, "application/json"));
        Ok(self.json(Method::POST, "/v1/keys", body).await?.1)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeySummary>, ClientError> {
        Ok(self.json(Method::GET, "/v1/keys", None).await?.1)
    }

    pub async fn export_key(&self, key_id: &str) -> Result<String, ClientError> {
        Ok(self
            .send(Method::GET, &format!("/v1/keys/{key_id}"), None)
            .await?
            .1)
    }

    pub async fn remove_key(&self, key_id: &str) -> Result<KeyRemoved, ClientError> {
        let path = format!("/v1/keys/{key_id}");
        Ok(self.json(Method::DELETE, &path, None).await?.1)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        Ok(self.json(Method::GET, "/v1/status", None).await?.1)
    }

    /// "Check for updates and replace license keys".
    pub async fn update_keys(&self) -> Result<KeyUpdateReport, ClientError> {
        Ok(self.json(Method::POST, "/v1/keys/update", None).await?.1)
    }

    pub async fn allocate_key(&self, key_id: &str, stations: bool) -> Result<(), ClientError> {
        let body = serde_json::to_string(&AllocateRequest { stations }).expect("serializes");
        let path = format!("/v1/keys/{key_id}/allocate");
        self.send(Method::POST, &path, Some((body, "application/json")))
            .await?;
        Ok(())
    }

    /// Recent events, newest first, as JSON values.
    pub async fn events(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        Ok(self.json(Method::GET, "/v1/events", None).await?.1)
    }

    /// Online sync with the authority the server is configured with.
    pub async fn sync_now(&self) -> Result<SyncSummary, ClientError> {
        Ok(self.json(Method::POST, "/v1/sync", None).await?.1)
    }

    /// Starts a sync by file; returns the signed request file's text.
    pub async fn export_sync_request(&self) -> Result<String, ClientError> {
        Ok(self.send(Method::POST, "/v1/sync/request", None).await?.1)
    }

    pub async fn import_sync_response(
        &self,
        response_text: String,
    ) -> Result<SyncSummary, ClientError> {
        let body = Some((response_text, "application/json"));
        Ok(self.json(Method::POST, "/v1/sync/response", body).await?.1)
    }

    pub async fn sync_status(&self) -> Result<SyncStatus, ClientError> {
        Ok(self.json(Method::GET, "/v1/sync", None).await?.1)
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        Ok(self.json(Method::GET, "/healthz", None).await?.1)
    }
}
