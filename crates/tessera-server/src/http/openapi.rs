//! The OpenAPI document, generated from the handlers' annotations.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera license server", description = "Lease licenses to stations from vendor-signed keys."),
    paths(
        super::healthz,
        super::status,
        super::leases::checkout,
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

pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}
