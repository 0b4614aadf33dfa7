//! The vendor's records: customers, license server IDs, issued keys and renewal keys.
//!
//! Each function is one operation on an open connection, at the time `now_ms` the caller read
//! from the clock. Operations that read then write run in an immediate transaction, so two
//! concurrent admin calls cannot both pass a check that only one of them should.

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use tessera_core::key::{COMPONENTS_PER_KEY_MAX, LICENSES_PER_KEY_MAX, NAME_LENGTH_MAX, is_name};
use tessera_core::{LicenseKey, LicenseKeyPayload, PublicKey, SecretKey};

use crate::chain;
use crate::error::AuthorityError;
use crate::ids::{random_key_id, random_server_id};
use crate::store::{self, DAY_MS, KeyRow, SERVER_COLUMNS, ServerRow, timestamp};
use crate::wire::{CustomerInfo, IssueKey, KeyInfo, RenewKey, ServerInfo};

/// Longest validity a key may be issued with (about ten years). Longer is almost surely a
/// typo, and a vendor extends a key by registering a renewal, not by issuing it for ever.
pub const VALID_DAYS_MAX: u32 = 3_660;
/// Random IDs collide rarely (40 bits); a few retries make a collision invisible.
const ID_ATTEMPTS_MAX: usize = 8;

/// Key times are whole seconds, like keys issued offline by `tessera vendor issue`: key files
/// are read by people, and a key starting up to a second early changes nothing.
pub fn whole_second_ms(ms: i64) -> i64 {
    ms - ms.rem_euclid(1_000)
}

// ---- validation (pure) ----------------------------------------------------------------------

/// A customer name is what a person typed: 1–128 bytes, no control characters, no leading or
/// trailing spaces (which would make two customers look the same in a list).
pub fn check_customer_name(name: &str) -> Result<(), AuthorityError> {
    if name.is_empty() || name.len() > NAME_LENGTH_MAX {
        return Err(AuthorityError::invalid(format!(
            "a customer name has 1 to {NAME_LENGTH_MAX} bytes"
        )));
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err(AuthorityError::invalid(format!(
            "customer name {name:?} has leading/trailing spaces or control characters"
        )));
    }
    Ok(())
}

/// Trims, sorts and deduplicates components, and checks each is a valid name.
pub fn check_components(components: &[String]) -> Result<Vec<String>, AuthorityError> {
    let mut components: Vec<String> = components
        .iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    components.sort();
    components.dedup();
    if components.is_empty() || components.len() > COMPONENTS_PER_KEY_MAX {
        return Err(AuthorityError::invalid(format!(
            "a key licenses 1 to {COMPONENTS_PER_KEY_MAX} components, not {}",
            components.len()
        )));
    }
    if let Some(bad) = components.iter().find(|c| !is_name(c)) {
        return Err(AuthorityError::invalid(format!(
            "component {bad:?} is not a valid name (letters, digits, '-', '_', '.')"
        )));
    }
    Ok(components)
}

pub fn check_licenses(licenses: u32) -> Result<(), AuthorityError> {
    if licenses == 0 || licenses > LICENSES_PER_KEY_MAX {
        return Err(AuthorityError::invalid(format!(
            "licenses must be 1 to {LICENSES_PER_KEY_MAX}, not {licenses}"
        )));
    }
    Ok(())
}

pub fn check_valid_days(valid_days: u32) -> Result<(), AuthorityError> {
    if valid_days == 0 || valid_days > VALID_DAYS_MAX {
        return Err(AuthorityError::invalid(format!(
            "valid_days must be 1 to {VALID_DAYS_MAX}, not {valid_days}"
        )));
    }
    Ok(())
}

/// When a renewal key is valid: from the end of the key it renews (so the two do not overlap
/// and the customer loses no days by renewing early), or from now if that key already ended.
pub fn renewal_window_ms(renewed_valid_until_ms: i64, now_ms: i64, valid_days: u32) -> (i64, i64) {
    let from_ms = renewed_valid_until_ms.max(now_ms);
    (from_ms, from_ms + i64::from(valid_days) * DAY_MS)
}

// ---- customers ------------------------------------------------------------------------------

/// How long a certificate from an online sync lasts when the vendor chose nothing for the
/// customer.
pub const ONLINE_CERTIFICATE_DAYS_DEFAULT: i64 = 30;

fn check_certificate_days(days: Option<i64>) -> Result<(), AuthorityError> {
    match days {
        Some(days) if !(1..=tessera_core::sync::CERTIFICATE_VALIDITY_DAYS).contains(&days) => {
            Err(AuthorityError::invalid(format!(
                "online_certificate_days must be between 1 and {}, not {days}",
                tessera_core::sync::CERTIFICATE_VALIDITY_DAYS
            )))
        }
        _ => Ok(()),
    }
}

/// The days an online sync certifies a server of `customer` for.
pub fn online_certificate_days(
    connection: &Connection,
    customer: &str,
) -> Result<i64, AuthorityError> {
    let days: Option<i64> = connection
        .query_row(
            "SELECT online_certificate_days FROM customers WHERE name = ?1",
            params![customer],
            |row| row.get(0),
        )
        .optional()?
        .flatten();
    Ok(days.unwrap_or(ONLINE_CERTIFICATE_DAYS_DEFAULT))
}

/// Sets (or, with `None`, resets to the default) how long an online sync certifies the
/// customer's servers; applies from their next sync.
pub fn set_customer(
    connection: &Connection,
    name: &str,
    online_certificate_days: Option<i64>,
) -> Result<CustomerInfo, AuthorityError> {
    check_certificate_days(online_certificate_days)?;
    let changed = connection.execute(
        "UPDATE customers SET online_certificate_days = ?2 WHERE name = ?1",
        params![name, online_certificate_days],
    )?;
    if changed == 0 {
        return Err(AuthorityError::invalid(format!(
            "no customer named {name:?}"
        )));
    }
    list_customers(connection)?
        .into_iter()
        .find(|customer| customer.name == name)
        .ok_or_else(|| AuthorityError::invalid(format!("no customer named {name:?}")))
}

pub fn add_customer(
    connection: &Connection,
    name: &str,
    online_certificate_days: Option<i64>,
    now_ms: i64,
) -> Result<CustomerInfo, AuthorityError> {
    check_customer_name(name)?;
    check_certificate_days(online_certificate_days)?;
    match connection.execute(
        "INSERT INTO customers (name, created_at_ms, online_certificate_days) VALUES (?1, ?2, ?3)",
        params![name, now_ms, online_certificate_days],
    ) {
        Ok(_) => Ok(CustomerInfo {
            name: name.to_string(),
            created_at: timestamp(now_ms)?,
            servers: 0,
            online_certificate_days: online_certificate_days
                .unwrap_or(ONLINE_CERTIFICATE_DAYS_DEFAULT),
        }),
        Err(error) if is_constraint(&error) => Err(AuthorityError::CustomerExists {
            name: name.to_string(),
        }),
        Err(error) => Err(error.into()),
    }
}

pub fn list_customers(connection: &Connection) -> Result<Vec<CustomerInfo>, AuthorityError> {
    let mut statement = connection.prepare(
        "SELECT c.name, c.created_at_ms, \
                (SELECT count(*) FROM servers s WHERE s.customer = c.name), \
                c.online_certificate_days \
         FROM customers c ORDER BY c.name",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, Option<i64>>(3)?,
        ))
    })?;
    rows.map(|row| {
        let (name, created_at_ms, servers, days) = row?;
        Ok(CustomerInfo {
            name,
            created_at: timestamp(created_at_ms)?,
            servers: u64::try_from(servers).unwrap_or(0),
            online_certificate_days: days.unwrap_or(ONLINE_CERTIFICATE_DAYS_DEFAULT),
        })
    })
    .collect()
}

fn customer_exists(connection: &Connection, name: &str) -> Result<bool, AuthorityError> {
    Ok(connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM customers WHERE name = ?1)",
        params![name],
        |row| row.get(0),
    )?)
}

// ---- license server IDs ---------------------------------------------------------------------

pub fn server_info(row: &ServerRow) -> Result<ServerInfo, AuthorityError> {
    let optional = |ms: Option<i64>| ms.map(timestamp).transpose();
    let key_fingerprint = match &row.public_key {
        Some(base64) => Some(
            PublicKey::from_base64(base64)
                .map_err(|e| AuthorityError::Internal(format!("stored public key: {e}")))?
                .fingerprint(),
        ),
        None => None,
    };
    Ok(ServerInfo {
        server_id: row.server_id.clone(),
        customer: row.customer.clone(),
        created_at: timestamp(row.created_at_ms)?,
        public_key: row.public_key.clone(),
        key_fingerprint,
        bound_at: optional(row.bound_at_ms)?,
        last_sync_at: optional(row.last_sync_at_ms)?,
        last_sequence: row.last_sequence,
        certificate_valid_until: optional(
            row.certificate_valid_until_ms.or(
                // Synced before migration 4: every certificate ran 366 days then.
                row.last_sync_at_ms
                    .map(|ms| ms + tessera_core::sync::CERTIFICATE_VALIDITY_DAYS * DAY_MS),
            ),
        )?,
    })
}

pub fn add_server(
    connection: &mut Connection,
    customer: &str,
    create_customer: bool,
    now_ms: i64,
) -> Result<ServerInfo, AuthorityError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !customer_exists(&transaction, customer)? {
        if !create_customer {
            return Err(AuthorityError::UnknownCustomer {
                name: customer.to_string(),
            });
        }
        add_customer(&transaction, customer, None, now_ms)?;
    }
    for _ in 0..ID_ATTEMPTS_MAX {
        let server_id = random_server_id()
            .map_err(|e| AuthorityError::Internal(format!("no randomness: {e}")))?;
        let inserted = transaction.execute(
            "INSERT INTO servers (server_id, customer, created_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (server_id) DO NOTHING",
            params![server_id, customer, now_ms],
        )?;
        if inserted == 1 {
            let row = store::server(&transaction, &server_id)?;
            transaction.commit()?;
            return server_info(&row);
        }
    }
    Err(AuthorityError::Internal(format!(
        "no free server ID after {ID_ATTEMPTS_MAX} random attempts"
    )))
}

pub fn list_servers(
    connection: &Connection,
    customer: Option<&str>,
) -> Result<Vec<ServerInfo>, AuthorityError> {
    let mut statement = connection.prepare(&format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE ?1 IS NULL OR customer = ?1 \
         ORDER BY customer, created_at_ms, server_id"
    ))?;
    let rows = statement.query_map(params![customer], ServerRow::from_row)?;
    rows.map(|row| server_info(&row?)).collect()
}

/// Clears the key pair bound to a server ID and its sync chain, so the next sync binds
/// whichever key pair asks first and starts a new chain: the vendor's answer to "we
/// reinstalled the server" and to a clone or rollback once only the legitimate installation
/// is left. The sequence restarts with the new binding, since a fresh installation counts
/// from 1 again. Recorded as a `chain_reset` alert.
pub fn reset_server(
    connection: &mut Connection,
    server_id: &str,
    now_ms: i64,
) -> Result<ServerInfo, AuthorityError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let changed = transaction.execute(
        "UPDATE servers SET public_key = NULL, bound_at_ms = NULL, last_sequence = 0 \
         WHERE server_id = ?1",
        params![server_id],
    )?;
    if changed == 0 {
        return Err(AuthorityError::UnknownServer {
            server_id: server_id.to_string(),
        });
    }
    let links = chain::clear(&transaction, server_id, now_ms)?;
    chain::record_alert(
        &transaction,
        server_id,
        chain::CHAIN_RESET,
        None,
        &format!(
            "the vendor reset the key pair binding and the sync chain ({links} responses): the next sync binds its key pair and starts a new chain"
        ),
        now_ms,
    )?;
    let info = server_info(&store::server(&transaction, server_id)?)?;
    transaction.commit()?;
    tracing::info!(server_id, links, "server ID binding and sync chain reset");
    Ok(info)
}

// ---- keys -----------------------------------------------------------------------------------

pub fn key_info(row: &KeyRow) -> Result<KeyInfo, AuthorityError> {
    let payload = &row.key.payload;
    Ok(KeyInfo {
        key_id: row.key_id.clone(),
        server_id: row.server_id.clone(),
        customer: payload.customer.clone(),
        components: payload.components.clone(),
        licenses: payload.licenses,
        valid_from: payload.valid_from,
        valid_until: payload.valid_until,
        issued_at: payload.issued_at,
        renews: row.renews.clone(),
        revoked_at: row.revoked_at_ms.map(timestamp).transpose()?,
    })
}

/// Signs a payload and records it, retrying with a fresh id on the (rare) id collision.
fn sign_and_insert(
    transaction: &Connection,
    vendor: &SecretKey,
    mut payload: LicenseKeyPayload,
) -> Result<LicenseKey, AuthorityError> {
    let server_id = payload
        .server_id
        .clone()
        .ok_or_else(|| AuthorityError::Internal("authority keys name their server".into()))?;
    for _ in 0..ID_ATTEMPTS_MAX {
        payload.key_id =
            random_key_id().map_err(|e| AuthorityError::Internal(format!("no randomness: {e}")))?;
        let key = LicenseKey::sign(payload.clone(), vendor)
            .map_err(|e| AuthorityError::invalid(e.to_string()))?;
        let inserted = transaction.execute(
            "INSERT INTO keys (key_id, server_id, customer, renews, valid_from_ms, \
                               valid_until_ms, issued_at_ms, key_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (key_id) DO NOTHING",
            params![
                key.payload.key_id,
                server_id,
                key.payload.customer,
                key.payload.renews,
                key.payload.valid_from_ms(),
                key.payload.valid_until_ms(),
                key.payload.issued_at.as_millisecond(),
                serde_json::to_string(&key).map_err(|e| AuthorityError::Internal(e.to_string()))?,
            ],
        )?;
        if inserted == 1 {
            return Ok(key);
        }
    }
    Err(AuthorityError::Internal(format!(
        "no free key id after {ID_ATTEMPTS_MAX} random attempts"
    )))
}

pub fn issue_key(
    connection: &mut Connection,
    vendor: &SecretKey,
    request: &IssueKey,
    now_ms: i64,
) -> Result<LicenseKey, AuthorityError> {
    let components = check_components(&request.components)?;
    check_licenses(request.licenses)?;
    check_valid_days(request.valid_days)?;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let server = store::server(&transaction, &request.server_id)?;
    if let Some(customer) = &request.customer
        && *customer != server.customer
    {
        return Err(AuthorityError::invalid(format!(
            "license server {} belongs to customer {:?}, not {customer:?}",
            server.server_id, server.customer
        )));
    }
    let now_ms = whole_second_ms(now_ms);
    let now = timestamp(now_ms)?;
    let payload = LicenseKeyPayload {
        key_id: String::new(),
        customer: server.customer.clone(),
        components,
        licenses: request.licenses,
        valid_from: now,
        valid_until: timestamp(now_ms + i64::from(request.valid_days) * DAY_MS)?,
        server_id: Some(server.server_id.clone()),
        renews: None,
        certified_server_required: false,
        max_borrow_days: request.max_borrow_days,
        grace_minutes: request.grace_minutes,
        issued_at: now,
    };
    let key = sign_and_insert(&transaction, vendor, payload)?;
    transaction.commit()?;
    tracing::info!(
        key_id = key.key_id(),
        server_id = server.server_id,
        "key issued"
    );
    Ok(key)
}

/// Registers the renewal key for `key_id`: held by the authority and handed to the server at
/// each sync until the renewal itself expires. Components and licenses default to the
/// renewed key's; the server decides whether it can take over automatically.
pub fn renew_key(
    connection: &mut Connection,
    vendor: &SecretKey,
    key_id: &str,
    request: &RenewKey,
    now_ms: i64,
) -> Result<LicenseKey, AuthorityError> {
    check_valid_days(request.valid_days)?;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let renewed = store::key(&transaction, key_id)?;
    if renewed.revoked_at_ms.is_some() {
        return Err(AuthorityError::KeyRevoked {
            key_id: key_id.to_string(),
        });
    }
    // One live renewal per key: two would leave the server to guess which one replaces it.
    let existing = store::keys_where(
        &transaction,
        "renews = ?1 AND revoked_at_ms IS NULL",
        params![key_id],
    )?;
    if let Some(existing) = existing.first() {
        return Err(AuthorityError::RenewalExists {
            key_id: key_id.to_string(),
            renewal_id: existing.key_id.clone(),
        });
    }
    let old = &renewed.key.payload;
    let components = match &request.components {
        Some(components) => check_components(components)?,
        None => old.components.clone(),
    };
    let licenses = request.licenses.unwrap_or(old.licenses);
    check_licenses(licenses)?;
    let now_ms = whole_second_ms(now_ms);
    let (from_ms, until_ms) = renewal_window_ms(old.valid_until_ms(), now_ms, request.valid_days);
    let payload = LicenseKeyPayload {
        key_id: String::new(),
        customer: old.customer.clone(),
        components,
        licenses,
        valid_from: timestamp(from_ms)?,
        valid_until: timestamp(until_ms)?,
        server_id: Some(renewed.server_id.clone()),
        renews: Some(key_id.to_string()),
        certified_server_required: old.certified_server_required,
        // The renewal keeps what the vendor allowed the application.
        max_borrow_days: old.max_borrow_days,
        grace_minutes: old.grace_minutes,
        issued_at: timestamp(now_ms)?,
    };
    let key = sign_and_insert(&transaction, vendor, payload)?;
    transaction.commit()?;
    tracing::info!(
        key_id = key.key_id(),
        renews = key_id,
        "renewal key registered"
    );
    Ok(key)
}

/// Revokes a key (an issued key or a renewal key). Revoking twice keeps the first time.
pub fn revoke_key(
    connection: &Connection,
    key_id: &str,
    now_ms: i64,
) -> Result<KeyInfo, AuthorityError> {
    let changed = connection.execute(
        "UPDATE keys SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE key_id = ?1",
        params![key_id, now_ms],
    )?;
    if changed == 0 {
        return Err(AuthorityError::UnknownKey {
            key_id: key_id.to_string(),
        });
    }
    tracing::info!(key_id, "key revoked");
    key_info(&store::key(connection, key_id)?)
}

pub fn list_keys(
    connection: &Connection,
    server_id: Option<&str>,
) -> Result<Vec<KeyInfo>, AuthorityError> {
    store::keys_where(
        connection,
        "?1 IS NULL OR server_id = ?1",
        params![server_id],
    )?
    .iter()
    .map(key_info)
    .collect()
}

fn is_constraint(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_in_memory;

    const NOW_MS: i64 = 1_750_000_000_000;

    fn vendor() -> SecretKey {
        SecretKey::from_seed([1; 32])
    }

    fn issue(connection: &mut Connection, server_id: &str, days: u32) -> LicenseKey {
        let request = IssueKey {
            server_id: server_id.into(),
            components: vec!["cam".into(), " cad ".into(), "cam".into()],
            licenses: 5,
            valid_days: days,
            customer: None,
            max_borrow_days: 0,
            grace_minutes: 0,
        };
        issue_key(connection, &vendor(), &request, NOW_MS).unwrap()
    }

    #[test]
    fn customer_names_are_checked() {
        assert!(check_customer_name("Acme Corp.").is_ok());
        for bad in ["", " Acme", "Acme ", "Ac\nme", &"x".repeat(129)] {
            assert_eq!(
                check_customer_name(bad).unwrap_err().code(),
                "invalid_request",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn components_are_normalized_and_bounded() {
        let given = ["b".to_string(), " a".into(), "b".into(), "".into()];
        assert_eq!(check_components(&given).unwrap(), ["a", "b"]);
        assert!(check_components(&[]).is_err());
        assert!(check_components(&["a b".into()]).is_err());
        let too_many: Vec<String> = (0..=COMPONENTS_PER_KEY_MAX)
            .map(|i| format!("c{i}"))
            .collect();
        assert!(check_components(&too_many).is_err());
    }

    #[test]
    fn licenses_and_days_are_bounded() {
        assert!(check_licenses(0).is_err());
        assert!(check_licenses(1).is_ok());
        assert!(check_licenses(LICENSES_PER_KEY_MAX + 1).is_err());
        assert!(check_valid_days(0).is_err());
        assert!(check_valid_days(VALID_DAYS_MAX).is_ok());
        assert!(check_valid_days(VALID_DAYS_MAX + 1).is_err());
    }

    #[test]
    fn key_times_are_whole_seconds() {
        assert_eq!(whole_second_ms(1_999), 1_000);
        assert_eq!(whole_second_ms(2_000), 2_000);
        assert_eq!(whole_second_ms(-1), -1_000);
    }

    #[test]
    fn a_renewal_starts_when_the_renewed_key_ends_or_now_if_it_already_ended() {
        assert_eq!(
            renewal_window_ms(10 * DAY_MS, DAY_MS, 30),
            (10 * DAY_MS, 40 * DAY_MS)
        );
        assert_eq!(
            renewal_window_ms(DAY_MS, 10 * DAY_MS, 30),
            (10 * DAY_MS, 40 * DAY_MS)
        );
    }

    #[test]
    fn servers_are_created_with_their_customer_only_when_asked() {
        let mut db = open_in_memory();
        let error = add_server(&mut db, "acme", false, NOW_MS).unwrap_err();
        assert_eq!(error.code(), "unknown_customer");
        let server = add_server(&mut db, "acme", true, NOW_MS).unwrap();
        assert!(crate::ids::is_server_id(&server.server_id));
        assert_eq!(server.public_key, None);
        assert_eq!(list_customers(&db).unwrap()[0].servers, 1);
        assert_eq!(
            add_customer(&db, "acme", None, NOW_MS).unwrap_err().code(),
            "customer_exists"
        );
    }

    #[test]
    fn issued_keys_verify_and_belong_to_the_servers_customer() {
        let mut db = open_in_memory();
        let server = add_server(&mut db, "acme", true, NOW_MS).unwrap();
        let key = issue(&mut db, &server.server_id, 30);
        let payload = key.verify(&[vendor().public_key()]).unwrap();
        assert_eq!(payload.customer, "acme");
        assert_eq!(payload.components, ["cad", "cam"]);
        assert_eq!(
            payload.server_id.as_deref(),
            Some(server.server_id.as_str())
        );
        assert_eq!(
            payload.valid_until_ms() - payload.valid_from_ms(),
            30 * DAY_MS
        );
        let stored = store::key(&db, key.key_id()).unwrap();
        assert_eq!(stored.key, key);

        let wrong_customer = IssueKey {
            customer: Some("globex".into()),
            ..IssueKey {
                server_id: server.server_id.clone(),
                components: vec!["cad".into()],
                licenses: 1,
                valid_days: 1,
                customer: None,
                max_borrow_days: 0,
                grace_minutes: 0,
            }
        };
        let error = issue_key(&mut db, &vendor(), &wrong_customer, NOW_MS).unwrap_err();
        assert_eq!(error.code(), "invalid_request");
    }

    #[test]
    fn one_live_renewal_per_key_and_none_for_revoked_keys() {
        let mut db = open_in_memory();
        let server = add_server(&mut db, "acme", true, NOW_MS).unwrap();
        let key = issue(&mut db, &server.server_id, 30);
        let request = RenewKey {
            valid_days: 365,
            components: None,
            licenses: Some(8),
        };
        let renewal = renew_key(&mut db, &vendor(), key.key_id(), &request, NOW_MS).unwrap();
        assert_eq!(renewal.payload.renews.as_deref(), Some(key.key_id()));
        assert_eq!(renewal.payload.valid_from, key.payload.valid_until);
        assert_eq!(renewal.payload.licenses, 8);
        assert_eq!(renewal.payload.components, key.payload.components);

        let again = renew_key(&mut db, &vendor(), key.key_id(), &request, NOW_MS).unwrap_err();
        assert_eq!(again.code(), "renewal_exists");
        revoke_key(&db, renewal.key_id(), NOW_MS).unwrap();
        renew_key(&mut db, &vendor(), key.key_id(), &request, NOW_MS).unwrap();

        revoke_key(&db, key.key_id(), NOW_MS).unwrap();
        let revoked = renew_key(&mut db, &vendor(), key.key_id(), &request, NOW_MS).unwrap_err();
        assert_eq!(revoked.code(), "key_revoked");
    }

    #[test]
    fn revoking_twice_keeps_the_first_time() {
        let mut db = open_in_memory();
        let server = add_server(&mut db, "acme", true, NOW_MS).unwrap();
        let key = issue(&mut db, &server.server_id, 30);
        let first = revoke_key(&db, key.key_id(), NOW_MS).unwrap();
        let second = revoke_key(&db, key.key_id(), NOW_MS + 1_000).unwrap();
        assert_eq!(first.revoked_at, second.revoked_at);
        assert_eq!(
            revoke_key(&db, "K-NOPE", NOW_MS).unwrap_err().code(),
            "unknown_key"
        );
    }
}
