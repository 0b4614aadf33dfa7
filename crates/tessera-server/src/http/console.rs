//! A read-only overview page at `/`: keys, components and leases, refreshed every 5 s.
//! (The full console with login and actions is a later piece of work.)

use std::fmt::Write;

use axum::extract::State;
use axum::response::Html;

use crate::state::SharedState;

pub async fn page(State(state): State<SharedState>) -> Html<String> {
    let status = state.status();
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>Tessera</title><style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}\
         th{background:#f3f3f3}.free{color:#070}.none{color:#a00}</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>Tessera license server</h1><p>Server ID: {} &middot; role: {} &middot; {}</p>",
        escape(status.server_id.as_deref().unwrap_or("(none)")),
        escape(&status.role),
        escape(&status.now.to_string())
    );
    html.push_str("<h2>Components</h2><table><tr><th>Component</th><th>Licenses</th><th>In use</th><th>Free</th><th>Holders</th></tr>");
    for component in &status.components {
        let holders: Vec<String> = component
            .holders
            .iter()
            .map(|h| {
                format!(
                    "{} ({}@{})",
                    escape(&h.station),
                    escape(&h.user),
                    escape(&h.host)
                )
            })
            .collect();
        let class = if component.free > 0 { "free" } else { "none" };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class={class}>{}</td><td>{}</td></tr>",
            escape(&component.component),
            component.licenses,
            component.in_use,
            component.free,
            holders.join(", ")
        );
    }
    html.push_str("</table><h2>License keys</h2><table><tr><th>Key</th><th>Customer</th><th>Components</th><th>Licenses</th><th>In use</th><th>Valid until</th><th>State</th></tr>");
    for key in &status.keys {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&key.key_id),
            escape(&key.customer),
            escape(&key.components.join(", ")),
            key.licenses,
            key.in_use,
            escape(&key.valid_until.to_string()),
            escape(&key.state)
        );
    }
    html.push_str("</table><h2>Leases</h2><table><tr><th>Station</th><th>User</th><th>Host</th><th>Components</th><th>Key</th><th>Since</th><th>Expires</th></tr>");
    for lease in &status.leases {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&lease.station),
            escape(&lease.user),
            escape(&lease.host),
            escape(&lease.components.join(", ")),
            escape(&lease.key_id),
            escape(&lease.issued_at.to_string()),
            escape(&lease.expires_at.to_string())
        );
    }
    html.push_str("</table><p><a href=/v1/status>status JSON</a> &middot; <a href=/metrics>metrics</a> &middot; <a href=/v1/openapi.json>OpenAPI</a></p></body></html>");
    Html(html)
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
