//! Admin API over the history database: `GET /v1/reports/usage`, `GET /v1/audit/verify`,
//! and the middleware that appends every administrator request to the audit chain.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use serde::Deserialize;

use crate::audit::Verification;
use crate::error::ApiError;
use crate::extract::{Admin, ApiQuery};
use crate::history::UsageEvent;
use crate::state::{SharedState, timestamp};

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `YYYY-MM-DD` (start of that day, UTC); an RFC 3339 time is taken too. Default: the
    /// beginning.
    #[param(format = Date)]
    pub from: Option<String>,
    /// `YYYY-MM-DD` (through the end of that day, UTC); an RFC 3339 time is taken too.
    /// Default: now.
    #[param(format = Date)]
    pub to: Option<String>,
    /// `csv` (default) or `json`.
    #[param(pattern = "^(csv|json)$")]
    pub format: Option<String>,
}

/// One row of the usage report in JSON (`format=json`); the CSV has the same columns.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    #[schema(value_type = String, format = DateTime)]
    pub time: String,
    /// `granted`, `existing`, `checkin`, `force_release`, `expired`, `key_removed`,
    /// `denied`, `key_imported`.
    pub kind: String,
    pub component: Option<String>,
    pub station: Option<String>,
    pub user: Option<String>,
    pub host: Option<String>,
    pub key_id: Option<String>,
    pub lease_id: Option<String>,
    /// Change of the licenses in use of `component`.
    pub delta: i64,
    pub detail: Option<String>,
}

/// Parses a report bound; a plain date is the start of that day, or of the next day for
/// `end_of_day`.
pub fn parse_bound(name: &str, text: &str, end_of_day: bool) -> Result<i64, ApiError> {
    if let Ok(time) = text.parse::<Timestamp>() {
        return Ok(time.as_millisecond());
    }
    let bad = || ApiError::BadRequest {
        code: "invalid_query",
        message: format!("{name}={text:?}: expected YYYY-MM-DD or an RFC 3339 time"),
    };
    let date: jiff::civil::Date = text.parse().map_err(|_| bad())?;
    let date = if end_of_day {
        match date.tomorrow() {
            Ok(next) => next,
            // Through the end of the last day there is: every event.
            Err(_) => return Ok(i64::MAX),
        }
    } else {
        date
    };
    let zoned = date.to_zoned(jiff::tz::TimeZone::UTC).map_err(|_| bad())?;
    Ok(zoned.timestamp().as_millisecond())
}

pub fn bounds(state: &SharedState, query: &UsageQuery) -> Result<(i64, i64), ApiError> {
    let from_ms = match &query.from {
        Some(text) if !text.is_empty() => parse_bound("from", text, false)?,
        _ => i64::MIN,
    };
    let to_ms = match &query.to {
        Some(text) if !text.is_empty() => parse_bound("to", text, true)?,
        _ => state.stamper.now_ms().saturating_add(1),
    };
    Ok((from_ms, to_ms))
}

pub async fn usage_events(
    state: &SharedState,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<UsageEvent>, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.history.usage(from_ms, to_ms))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Checks the audit chain, and against the head the vendor countersigned at this host's
/// last sync.
pub async fn verification(state: &SharedState) -> Result<Verification, ApiError> {
    let installation = crate::sync::installation(&state.config.data_dir);
    let point = state.consensus.read(|ledger| {
        ledger
            .sync_state()
            .countersigned
            .get(&installation)
            .and_then(|c| c.audit.clone())
    });
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.history.verify_against(point.as_ref()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

pub const CSV_HEADER: &str = "time,kind,component,station,user,host,key_id,lease_id,delta,detail";

/// Writes one CSV cell. A cell a spreadsheet would run as a formula (starting with `=`, `+`,
/// `-`, `@`, a tab or a carriage return, and not a plain number) gets a leading `'`: user and
/// host names come from stations, and an export must not carry their formulas into the
/// administrator's spreadsheet.
fn csv_field(out: &mut String, text: &str) {
    let formula =
        text.starts_with(['=', '+', '-', '@', '\t', '\r']) && text.parse::<f64>().is_err();
    let neutral;
    let text = if formula {
        neutral = format!("'{text}");
        neutral.as_str()
    } else {
        text
    };
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

pub fn to_csv(events: &[UsageEvent]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for event in events {
        let fields = [
            timestamp(event.at_ms).to_string(),
            event.kind.clone(),
            event.component.clone().unwrap_or_default(),
            event.station.clone().unwrap_or_default(),
            event.user.clone().unwrap_or_default(),
            event.host.clone().unwrap_or_default(),
            event.key_id.clone().unwrap_or_default(),
            event.lease_id.clone().unwrap_or_default(),
            event.delta.to_string(),
            event.detail.clone().unwrap_or_default(),
        ];
        for (index, field) in fields.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            csv_field(&mut out, field);
        }
        out.push('\n');
    }
    out
}

/// The report as an HTTP answer, CSV or JSON.
pub async fn usage_answer(state: &SharedState, query: &UsageQuery) -> Result<Response, ApiError> {
    let (from_ms, to_ms) = bounds(state, query)?;
    let events = usage_events(state, from_ms, to_ms).await?;
    match query.format.as_deref().unwrap_or("csv") {
        "csv" => Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"tessera-usage.csv\"",
                ),
            ],
            to_csv(&events),
        )
            .into_response()),
        "json" => {
            let rows: Vec<UsageRow> = events
                .iter()
                .map(|event| UsageRow {
                    time: timestamp(event.at_ms).to_string(),
                    kind: event.kind.clone(),
                    component: event.component.clone(),
                    station: event.station.clone(),
                    user: event.user.clone(),
                    host: event.host.clone(),
                    key_id: event.key_id.clone(),
                    lease_id: event.lease_id.clone(),
                    delta: event.delta,
                    detail: event.detail.clone(),
                })
                .collect();
            Ok(axum::Json(rows).into_response())
        }
        other => Err(ApiError::BadRequest {
            code: "invalid_query",
            message: format!("format={other:?}: expected csv or json"),
        }),
    }
}

/// `GET /v1/reports/usage?from=&to=&format=csv|json` (admin).
///
/// Every checkout, return, expiry and key change in the period, from the history database.
#[utoipa::path(get, path = "/v1/reports/usage", params(UsageQuery), security(("admin_token" = [])), responses(
    (status = 200, description = "the report: CSV (default) or JSON rows", content(
        (String = "text/csv"),
        (Vec<UsageRow> = "application/json"),
    )),
    (status = 400, description = "invalid_query: a bound that is not a date or time, a format that is not csv or json", body = tessera_api::ErrorBody),
    (status = 500, description = "internal: the history database could not be read", body = tessera_api::ErrorBody),
))]
pub async fn usage_report(
    State(state): State<SharedState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Response, ApiError> {
    // The console's form sends empty fields for "no bound"; over the API a bound that is
    // there is a date, as the document says.
    for (name, value) in [("from", &query.from), ("to", &query.to)] {
        if value.as_deref() == Some("") {
            return Err(ApiError::BadRequest {
                code: "invalid_query",
                message: format!("{name} is empty: leave it out for no bound"),
            });
        }
    }
    usage_answer(&state, &query).await
}

/// `GET /v1/audit/verify` (admin): checks the chain, names the first broken record.
#[utoipa::path(get, path = "/v1/audit/verify", security(("admin_token" = [])), responses(
    (status = 200, description = "ok false names the first broken record", body = Verification),
    (status = 500, description = "internal: the history database could not be read", body = tessera_api::ErrorBody),
))]
pub async fn audit_verify(
    State(state): State<SharedState>,
    _admin: Admin,
) -> Result<axum::Json<Verification>, ApiError> {
    Ok(axum::Json(verification(&state).await?))
}

/// Routes whose non-GET requests are administrator actions.
const ADMIN_ROUTES: &[&str] = &[
    "/v1/keys",
    "/v1/keys/update",
    "/v1/keys/{key_id}/allocate",
    "/v1/keys/{key_id}",
    "/v1/leases/{lease_id}/release",
    "/v1/sync",
    "/v1/sync/request",
    "/v1/sync/response",
];

/// Appends every administrator request (API) to the audit chain with its answer's status.
pub async fn audit_admin_requests(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if let Some(route) = route
        && method != Method::GET
        && ADMIN_ROUTES.contains(&route.as_str())
    {
        state.history.admin_action(
            state.stamper.now_ms(),
            "admin-token",
            &format!("api {method} {route}"),
            serde_json::json!({"path": path, "status": response.status().as_u16()}),
        );
    }
    response
}
