//! Sorted, filtered pages of the leases for `GET /v1/leases` and the console's leases page
//! (the ledger's `lease_order.rs` does the work under the read lock).

use tessera_core::{LeaseCursor, LeaseFilter, LeaseOrder, LeaseSort};

use crate::error::ApiError;
use crate::state::AppState;

/// A listing's `sort=` and `order=` (`asc`, `desc`), read; `Err` says which is wrong.
pub fn parse_order(sort: Option<&str>, order: Option<&str>) -> Result<LeaseOrder, ApiError> {
    let sort = match sort.map(str::trim).filter(|s| !s.is_empty()) {
        None => LeaseSort::Id,
        Some(name) => LeaseSort::parse(name).ok_or_else(|| ApiError::BadRequest {
            code: "invalid_query",
            message: format!(
                "sort must be one of {}, not {name:?}",
                LeaseSort::ALL.map(LeaseSort::name).join(", ")
            ),
        })?,
    };
    let descending = match order.map(str::trim).filter(|s| !s.is_empty()) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::BadRequest {
                code: "invalid_query",
                message: format!("order must be asc or desc, not {other:?}"),
            });
        }
    };
    Ok(LeaseOrder { sort, descending })
}

/// A listing's `after=` or `before=` (not both).
pub fn parse_cursor<'a>(
    after: Option<&'a str>,
    before: Option<&'a str>,
) -> Result<Option<LeaseCursor<'a>>, ApiError> {
    let given = |cursor: Option<&'a str>| cursor.map(str::trim).filter(|c| !c.is_empty());
    match (given(after), given(before)) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest {
            code: "invalid_query",
            message: "give after or before, not both".into(),
        }),
        (Some(after), None) => Ok(Some(LeaseCursor::After(after))),
        (None, Some(before)) => Ok(Some(LeaseCursor::Before(before))),
        (None, None) => Ok(None),
    }
}

impl AppState {
    /// One page of the leases `filter` matches in `order`, after or before `cursor`, with
    /// the count of all matches and the cursors of the pages around it. A cursor that is not
    /// one of `order` is refused (400 `invalid_query`).
    pub fn sorted_lease_page(
        &self,
        filter: &LeaseFilter<'_>,
        order: LeaseOrder,
        cursor: Option<LeaseCursor<'_>>,
        limit: usize,
    ) -> Result<tessera_api::LeasePage, ApiError> {
        let page = self
            .read(|ledger| ledger.sorted_lease_page(filter, order, cursor, limit))
            .map_err(|error| ApiError::BadRequest {
                code: "invalid_query",
                message: error.to_string(),
            })?;
        let component = filter.component.filter(|c| !c.ends_with('*'));
        Ok(tessera_api::LeasePage {
            leases: page
                .leases
                .iter()
                .map(|lease| self.lease_to_api(lease, component))
                .collect(),
            total: page.total as u64,
            next: page.next,
            previous: page.previous,
            offset: page.offset as u64,
        })
    }
}
