//! The OpenAPI document, generated from the handlers' annotations.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera license server", description = "Lease licenses to stations from vendor-signed keys.

Every error answers `{\"error\": {\"code\", \"message\"}}` (ErrorBody). A known path asked with another method answers 405 `method_not_allowed` with `Allow`; an unknown path 404 `no_route`.

In a domain or a redundant pair, a backup forwards every write (POST, PUT, DELETE under /v1/) to the primary and relays its answer, or answers 503 `no_quorum` / `not_primary` itself; it buffers the body first (413 over the limit).

Not described here: the HTML console (`/`, `/login`, `/keys`, …), `POST /v1/test/clock` (404 unless started with `--test-clock`), and `/v1/raft/*`, the Raft traffic between the hosts of a domain or pair (served only with a domain secret, each request authenticated with it in `x-tessera-raft-auth`)."),
    paths(
        super::healthz,
        super::metrics,
        serve,
        super::status,
        super::domain::status,
        super::domain::add_host,
        super::domain::remove_host,
        super::pair::status,
        super::pair::enable,
        super::pair::disable,
        super::pair::sync,
        super::pair::rpc,
        super::leases::checkout,
        super::leases::list,
        super::leases::heartbeat,
        super::leases::checkin,
        super::admin::import_key,
        super::admin::list_keys,
        super::admin::export_key,
        super::admin::remove_key,
        super::admin::force_release,
        super::admin::update_keys,
        super::admin::allocate_key,
        super::admin::list_groups,
        super::admin::set_group,
        super::admin::events,
        super::sync::status,
        super::sync::sync_now,
        super::sync::export_request,
        super::sync::import_response,
        super::neighbours::identity,
        super::neighbours::list,
        super::neighbours::receive_grants,
        super::neighbours::renew,
        super::neighbours::components,
        super::neighbours::donate,
        super::neighbours::donations,
        super::neighbours::end_donation,
        crate::console::reports::usage_report,
        crate::console::reports::audit_verify,
    ),
    components(schemas(tessera_api::HeldGrant, tessera_api::ReturnedGrant, tessera_api::DonorSettings)),
    modifiers(&AdminToken)
)]
struct ApiDoc;

struct AdminToken;

impl utoipa::Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The answers every operation of a kind can give, whatever its handler: added to each
/// operation's own (descriptions joined when the handler names the status too).
fn add_common_responses(document: &mut serde_json::Value) {
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            let method = method.to_ascii_uppercase();
            let mut common: Vec<(&str, &str)> = Vec::new();
            // The `Admin` extractor (an empty requirement in the list: the token is optional).
            let security = operation["security"].as_array();
            let admin_only = security.is_some_and(|list| {
                !list.is_empty()
                    && list
                        .iter()
                        .all(|requirement| requirement.get("admin_token").is_some())
            });
            if admin_only {
                common.push(("401", "unauthorized: missing or wrong admin token"));
            }
            // `forward::forward_writes` on a backup of a domain or pair.
            let method = axum::http::Method::from_bytes(method.as_bytes())
                .unwrap_or(axum::http::Method::GET);
            if super::forward::is_write(&method, path) {
                common.push((
                    "413",
                    "body_too_large: a backup forwarding the write buffers the body",
                ));
                common.push((
                    "503",
                    "no_quorum, not_primary: in a domain or pair, no primary reachable to forward the write to (retry); pair_recovering",
                ));
            }
            let Some(responses) = operation["responses"].as_object_mut() else {
                continue;
            };
            for (status, description) in common {
                match responses.get_mut(status) {
                    Some(existing) => {
                        let text = existing["description"].as_str().unwrap_or_default();
                        if !text.contains(description) {
                            existing["description"] = if text.is_empty() {
                                description.into()
                            } else {
                                format!("{text}; {description}").into()
                            };
                        }
                    }
                    None => {
                        responses.insert(
                            status.to_string(),
                            serde_json::json!({
                                "description": description,
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/ErrorBody"
                                }}}
                            }),
                        );
                    }
                }
            }
        }
    }
}

pub fn openapi_json() -> String {
    let mut document =
        serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    add_common_responses(&mut document);
    serde_json::to_string_pretty(&document).expect("the OpenAPI document serializes")
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", responses(
    (status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object),
))]
pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}
