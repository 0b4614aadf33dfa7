//! Sorted pages of the leases: the listings' `sort=`, `order=`, `after=` and `before=`.
//!
//! A page costs one pass over the leases with a heap bounded by the page size (O(n log
//! page), no sort of them all, no copy of them all), whatever the order and the page: the
//! filters need that pass anyway for the count of matching leases. Every order is total: the
//! sorted value, then the lease id, so a cursor `VALUE~LEASE_ID` (the lease id alone in
//! lease-id order, as before sorting existed) names one place in it and pages never repeat
//! or skip a lease, even when many share a value.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Lease, LeaseFilter, LeaseView, Ledger};

/// What a lease listing is sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LeaseSort {
    /// The lease id (the listings' order before sorting existed, and the default).
    #[default]
    Id,
    /// When the lease runs out.
    Expires,
    /// When the station checked the lease out.
    Since,
    /// The last heartbeat.
    Heartbeat,
    Station,
    User,
    Host,
    Key,
}

impl LeaseSort {
    pub const ALL: [LeaseSort; 8] = [
        LeaseSort::Id,
        LeaseSort::Expires,
        LeaseSort::Since,
        LeaseSort::Heartbeat,
        LeaseSort::Station,
        LeaseSort::User,
        LeaseSort::Host,
        LeaseSort::Key,
    ];

    /// The name in a query (`sort=expires`); `issued` and `checked_out` also name `since`.
    pub fn parse(name: &str) -> Option<LeaseSort> {
        Some(match name {
            "id" | "lease" | "lease_id" => LeaseSort::Id,
            "expires" | "expiry" | "expires_at" => LeaseSort::Expires,
            "since" | "issued" | "issued_at" | "checked_out" => LeaseSort::Since,
            "heartbeat" | "renewed" | "renewed_at" => LeaseSort::Heartbeat,
            "station" => LeaseSort::Station,
            "user" => LeaseSort::User,
            "host" => LeaseSort::Host,
            "key" | "key_id" => LeaseSort::Key,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            LeaseSort::Id => "id",
            LeaseSort::Expires => "expires",
            LeaseSort::Since => "since",
            LeaseSort::Heartbeat => "heartbeat",
            LeaseSort::Station => "station",
            LeaseSort::User => "user",
            LeaseSort::Host => "host",
            LeaseSort::Key => "key",
        }
    }

    fn value(self, lease: &Lease) -> Value<'_> {
        match self {
            LeaseSort::Id => Value::None,
            LeaseSort::Expires => Value::Time(lease.expires_at_ms),
            LeaseSort::Since => Value::Time(lease.issued_at_ms),
            LeaseSort::Heartbeat => Value::Time(lease.renewed_at_ms),
            LeaseSort::Station => Value::Text(&lease.station),
            LeaseSort::User => Value::Text(&lease.user),
            LeaseSort::Host => Value::Text(&lease.host),
            LeaseSort::Key => Value::Text(&lease.key_id),
        }
    }

    /// The cursor naming `lease`'s place in this order: `VALUE~LEASE_ID`, or the lease id
    /// alone in lease-id order.
    pub fn cursor(self, lease: &LeaseView) -> String {
        let value = match self {
            LeaseSort::Id => return lease.lease_id.clone(),
            LeaseSort::Expires => lease.expires_at_ms.to_string(),
            LeaseSort::Since => lease.issued_at_ms.to_string(),
            LeaseSort::Heartbeat => lease.renewed_at_ms.to_string(),
            LeaseSort::Station => lease.station.clone(),
            LeaseSort::User => lease.user.clone(),
            LeaseSort::Host => lease.host.clone(),
            LeaseSort::Key => lease.key_id.clone(),
        };
        format!("{value}~{}", lease.lease_id)
    }

    /// A cursor of this order, read back; `Err` says what is wrong with it.
    fn parse_cursor(self, cursor: &str) -> Result<(Value<'_>, &str), BadCursor> {
        if self == LeaseSort::Id {
            return Ok((Value::None, cursor));
        }
        // Lease ids never contain `~`; a value may.
        let Some((value, id)) = cursor.rsplit_once('~') else {
            return Err(BadCursor::NotOfThisOrder {
                sort: self.name(),
                cursor: cursor.to_string(),
            });
        };
        let value = match self.value_kind() {
            Kind::Time => Value::Time(value.parse().map_err(|_| BadCursor::NotATime {
                sort: self.name(),
                value: value.to_string(),
            })?),
            Kind::Text => Value::Text(value),
        };
        Ok((value, id))
    }

    fn value_kind(self) -> Kind {
        match self {
            LeaseSort::Expires | LeaseSort::Since | LeaseSort::Heartbeat => Kind::Time,
            _ => Kind::Text,
        }
    }
}

/// A listing's cursor that is not one of its order (400 `invalid_query`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadCursor {
    #[error(
        "a cursor of sort={sort} is VALUE~LEASE_ID (the page's next or previous), not {cursor:?}"
    )]
    NotOfThisOrder { sort: &'static str, cursor: String },
    #[error("the cursor's value must be a time in ms for sort={sort}, not {value:?}")]
    NotATime { sort: &'static str, value: String },
}

enum Kind {
    Time,
    Text,
}

/// A lease's sorted value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Value<'a> {
    None,
    Time(i64),
    Text(&'a str),
}

/// An order of a listing: what, and which way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseOrder {
    pub sort: LeaseSort,
    pub descending: bool,
}

/// Where a page starts: after a cursor (the next page), or ends: before one (the previous).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseCursor<'a> {
    After(&'a str),
    Before(&'a str),
}

/// One sorted page of the matching leases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SortedLeasePage {
    /// The page, in the listing's order.
    pub leases: Vec<LeaseView>,
    /// How many leases match the filter in all.
    pub total: usize,
    /// How many matching leases come before the page's first.
    pub offset: usize,
    /// The cursor of the following page (`after=`), when one follows.
    pub next: Option<String>,
    /// The cursor of the page before (`before=`), when this is not the first.
    pub previous: Option<String>,
}

/// A matching lease in a page's heap: its place in the order, reversed when `flip`.
struct Ranked<'a> {
    place: (Value<'a>, &'a str),
    lease: &'a Lease,
    flip: bool,
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.place == other.place
    }
}

impl Eq for Ranked<'_> {}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        let ordering = self.place.cmp(&other.place);
        if self.flip {
            ordering.reverse()
        } else {
            ordering
        }
    }
}

impl Ledger {
    /// One page of the leases `filter` matches, in `order`, after or before `cursor`: at most
    /// `limit` of them, the count of all matches, and the cursors of the pages around it.
    /// `Err` names a cursor that is not one of this order.
    pub fn sorted_lease_page(
        &self,
        filter: &LeaseFilter<'_>,
        order: LeaseOrder,
        cursor: Option<LeaseCursor<'_>>,
        limit: usize,
    ) -> Result<SortedLeasePage, BadCursor> {
        let sort = order.sort;
        // The place of a lease in the listing's order: ascending `(value, id)`, or its
        // reverse.
        fn display<'x>(
            descending: bool,
            place: &(Value<'x>, &'x str),
            other: &(Value<'x>, &'x str),
        ) -> Ordering {
            let ordering = place.cmp(other);
            if descending {
                ordering.reverse()
            } else {
                ordering
            }
        }
        let (bound, before) = match cursor {
            None => (None, false),
            Some(LeaseCursor::After(cursor)) => (Some(sort.parse_cursor(cursor)?), false),
            Some(LeaseCursor::Before(cursor)) => (Some(sort.parse_cursor(cursor)?), true),
        };
        let matches = self.lease_matcher(filter);
        let mut total = 0;
        // Matches on the far side of the cursor: before it for `after`, from it on for
        // `before`.
        let mut beyond = 0;
        // After a cursor the page is the `limit` first in display order past it: a max-heap
        // in display order keeps them. Before a cursor it is the `limit` last in display
        // order short of it: a max-heap in the reverse order.
        let flip = order.descending != before;
        let mut heap: BinaryHeap<Ranked<'_>> = BinaryHeap::with_capacity(limit + 1);
        for lease in self.leases.values() {
            if !matches(lease) {
                continue;
            }
            total += 1;
            let place = (sort.value(lease), &*lease.id);
            if let Some(bound) = &bound {
                let side = display(order.descending, &place, bound);
                let in_page = if before {
                    side == Ordering::Less
                } else {
                    side == Ordering::Greater
                };
                if !in_page {
                    beyond += 1;
                    continue;
                }
            }
            if limit == 0 {
                continue;
            }
            let ranked = Ranked { place, lease, flip };
            if heap.len() < limit {
                heap.push(ranked);
            } else if heap.peek().is_some_and(|last| ranked < *last) {
                heap.pop();
                heap.push(ranked);
            }
        }
        let mut page: Vec<&Lease> = heap
            .into_sorted_vec()
            .into_iter()
            .map(|ranked| ranked.lease)
            .collect();
        if before {
            page.reverse();
        }
        let leases: Vec<LeaseView> = page.into_iter().map(Lease::view).collect();
        let on_this_side = total - beyond;
        let (offset, more_before, more_after) = if before {
            (
                on_this_side - leases.len(),
                on_this_side > leases.len(),
                beyond > 0,
            )
        } else {
            (beyond, beyond > 0, on_this_side > leases.len())
        };
        Ok(SortedLeasePage {
            next: more_after
                .then(|| leases.last().map(|lease| sort.cursor(lease)))
                .flatten(),
            previous: more_before
                .then(|| leases.first().map(|lease| sort.cursor(lease)))
                .flatten(),
            leases,
            total,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, user: &str, expires: i64) -> Lease {
        Lease {
            id: id.into(),
            key_id: "k".into(),
            components: smallvec::smallvec!["c".into()],
            station: format!("ws-{id}").into(),
            user: user.into(),
            host: "h".into(),
            issued_at_ms: 0,
            renewed_at_ms: 0,
            expires_at_ms: expires,
            borrowed: false,
        }
    }

    fn ledger(leases: Vec<Lease>) -> Ledger {
        let mut ledger = Ledger::new(Default::default());
        for lease in leases {
            ledger.leases.insert(lease.id.clone(), Box::new(lease));
        }
        ledger
    }

    fn ids(page: &SortedLeasePage) -> Vec<&str> {
        page.leases.iter().map(|l| l.lease_id.as_str()).collect()
    }

    /// Walks every page forwards then backwards; returns the ids seen going forwards.
    fn walk(
        ledger: &Ledger,
        filter: &LeaseFilter<'_>,
        order: LeaseOrder,
        limit: usize,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = ledger
                .sorted_lease_page(
                    filter,
                    order,
                    cursor.as_deref().map(LeaseCursor::After),
                    limit,
                )
                .unwrap();
            assert_eq!(page.offset, seen.len());
            assert_eq!(page.previous.is_some(), !seen.is_empty());
            seen.extend(page.leases.iter().map(|l| l.lease_id.clone()));
            pages.push(ids(&page).iter().map(|s| s.to_string()).collect::<Vec<_>>());
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        // Backwards from the last page: the same pages.
        let mut before = ledger
            .sorted_lease_page(
                filter,
                order,
                cursor.as_deref().map(LeaseCursor::After),
                limit,
            )
            .unwrap()
            .previous;
        for expected in pages.iter().rev().skip(1) {
            let page = ledger
                .sorted_lease_page(
                    filter,
                    order,
                    before.as_deref().map(LeaseCursor::Before),
                    limit,
                )
                .unwrap();
            assert_eq!(&ids(&page), expected);
            assert!(page.next.is_some());
            before = page.previous;
        }
        assert_eq!(before, None);
        seen
    }

    #[test]
    fn pages_follow_the_order_forwards_and_backwards_with_ties() {
        let users = ["bob", "ann", "ann", "cy", "ann", "bob", "dan"];
        let leases: Vec<Lease> = (0..7)
            .map(|i| lease(&format!("{:02x}", 20 - i), users[i], 1000 + (i as i64 % 3)))
            .collect();
        let ledger = ledger(leases.clone());
        let filter = LeaseFilter::default();
        for sort in LeaseSort::ALL {
            for descending in [false, true] {
                let order = LeaseOrder { sort, descending };
                let mut expected: Vec<&Lease> = leases.iter().collect();
                expected.sort_by(|a, b| (sort.value(a), &*a.id).cmp(&(sort.value(b), &*b.id)));
                if descending {
                    expected.reverse();
                }
                let expected: Vec<String> = expected.iter().map(|l| l.id.to_string()).collect();
                for limit in [1, 2, 3, 7, 10] {
                    assert_eq!(
                        walk(&ledger, &filter, order, limit),
                        expected,
                        "{order:?} {limit}"
                    );
                }
            }
        }
    }

    #[test]
    fn filters_are_exact_unless_starred_and_bad_cursors_are_refused() {
        let ledger = ledger(vec![
            lease("01", "user7", 1),
            lease("02", "user70", 2),
            lease("03", "user7", 3),
        ]);
        let exact = LeaseFilter {
            user: Some("user7"),
            ..Default::default()
        };
        let order = LeaseOrder {
            sort: LeaseSort::User,
            descending: true,
        };
        let page = ledger.sorted_lease_page(&exact, order, None, 10).unwrap();
        assert_eq!((ids(&page), page.total), (vec!["03", "01"], 2));
        let prefix = LeaseFilter {
            user: Some("user7*"),
            ..Default::default()
        };
        let page = ledger.sorted_lease_page(&prefix, order, None, 10).unwrap();
        assert_eq!((ids(&page), page.total), (vec!["02", "03", "01"], 3));
        let expires = LeaseOrder {
            sort: LeaseSort::Expires,
            descending: false,
        };
        assert!(
            ledger
                .sorted_lease_page(&prefix, expires, Some(LeaseCursor::After("01")), 10)
                .is_err()
        );
        assert!(
            ledger
                .sorted_lease_page(&prefix, expires, Some(LeaseCursor::After("x~01")), 10)
                .is_err()
        );
        let page = ledger
            .sorted_lease_page(&prefix, expires, Some(LeaseCursor::After("1~01")), 10)
            .unwrap();
        assert_eq!((ids(&page), page.offset), (vec!["02", "03"], 1));
    }
}
