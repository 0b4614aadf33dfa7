//! Typed answers: the outcome each command gets when the ledger does not refuse it, as its
//! own type. The runtime turns an [`Outcome`] into the answer its command is due
//! (`answer::Granted::try_from(outcome)?`), so a caller reads named fields and never writes
//! a catch-all arm: an outcome of another kind is [`Unexpected`] (a bug in the ledger, never
//! a station's fault), named once, here. A refusal never reaches this point: the runtime
//! answers [`Outcome::Refused`] as a refusal before.

use crate::outcome::Outcome;
use crate::records::{Donation, LeaseView, RenewalResult};

/// The ledger answered a command with an outcome of another kind than the one it is due.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the ledger answered {outcome:?} where {expected} was due")]
pub struct Unexpected {
    /// The outcome the command is due (`Outcome`'s variant).
    pub expected: &'static str,
    pub outcome: Box<Outcome>,
}

/// One answer type per outcome variant: a struct with the variant's fields, and the
/// conversion from [`Outcome`].
macro_rules! answers {
    ($(
        $(#[$doc:meta])*
        $name:ident = $variant:ident { $($field:ident : $ty:ty),* $(,)? }
    ),* $(,)?) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            $(pub $field: $ty),*
        }

        impl TryFrom<Outcome> for $name {
            type Error = Unexpected;

            fn try_from(outcome: Outcome) -> Result<$name, Unexpected> {
                match outcome {
                    Outcome::$variant { $($field),* } => Ok($name { $($field),* }),
                    outcome => Err(Unexpected {
                        expected: stringify!($variant),
                        outcome: Box::new(outcome),
                    }),
                }
            }
        }
    )*};
}

answers! {
    /// `Checkout`: the lease (`created` false: the station already held one covering the
    /// component).
    Granted = LeaseGranted { lease: LeaseView, created: bool },
    /// `Heartbeat`.
    Renewed = LeaseRenewed { lease: LeaseView },
    /// `Checkin`, `ForceRelease`.
    Released = LeaseReleased { lease: LeaseView },
    /// `ImportKey`.
    KeyImported = KeyImported { key_id: String },
    /// `RemoveKey`.
    KeyRemoved = KeyRemoved { key_id: String, leases_ended: u32 },
    /// `Expire`.
    Expired = Expired { leases_ended: u32 },
    /// `BeginSync`.
    SyncBegun = SyncBegun {
        sequence: u64,
        nonce: String,
        last_response: Option<String>,
        pending_since: Option<u64>,
    },
    /// `CompleteSync`.
    Synced = Synced {
        sequence: u64,
        imported: Vec<String>,
        revoked: Vec<String>,
        renewals: Vec<String>,
        certificate_valid_until_ms: i64,
    },
    /// `RenewKeys`.
    KeysRenewed = KeysRenewed {
        renewed: Vec<(String, RenewalResult)>,
        leases_moved: u32,
        leases_ended: u32,
    },
    /// `AllocateKey`.
    KeyAllocated = KeyAllocated { key_id: String, stations: bool },
    /// `AllocateKeyToGroups`.
    KeyAllocatedToGroups = KeyAllocatedToGroups { key_id: String, groups: Vec<String> },
    /// `AllocateKeyToNeighbours`.
    KeyAllocatedToNeighbours = KeyAllocatedToNeighbours {
        key_id: String,
        neighbours: Vec<String>,
    },
    /// `SetStationGroup`.
    StationGroupSet = StationGroupSet { group: String, stations: u32 },
    /// `Donate`.
    Donated = Donated { donation: Donation },
    /// `EndDonation`.
    DonationEnded = DonationEnded { donation: Donation },
    /// `RecordTrust`.
    TrustRecorded = TrustRecorded { added: Vec<String>, removed: Vec<String> },
    /// `GrantReturned` (a receiver gave licenses back).
    GrantReturned = GrantReturned { key_id: String, to: String, licenses_back: u32 },
    /// `AcceptGrant`.
    GrantAccepted = GrantAccepted {
        key_id: String,
        donor: String,
        licenses: u32,
        serial: u64,
        usable_until_ms: i64,
        leases_ended: u32,
        unknown_to_donor: Option<u64>,
    },
    /// `ReleaseGrant`.
    GrantReleased = GrantReleased {
        key_id: String,
        donor: String,
        serial: u64,
        leases_ended: u32,
        stations_until_ms: i64,
    },
    /// `SetPairSplit`.
    PairSplitSet = PairSplitSet { backup_percent: Option<u8> },
}

/// A proposal's result as the answer its command is due: a refusal or a failure stays the
/// error it was; an outcome of another kind becomes `E` from [`Unexpected`].
pub fn expect<A, E>(proposed: Result<Outcome, E>) -> Result<A, E>
where
    A: TryFrom<Outcome, Error = Unexpected>,
    E: From<Unexpected>,
{
    Ok(A::try_from(proposed?)?)
}

#[cfg(test)]
mod tests {
    use super::{Expired, Granted, Unexpected};
    use crate::outcome::Outcome;

    #[test]
    fn an_outcome_of_another_kind_is_named_with_the_one_due() {
        let answered = Outcome::Expired { leases_ended: 2 };
        let error = Granted::try_from(answered.clone()).unwrap_err();
        assert_eq!(
            error,
            Unexpected {
                expected: "LeaseGranted",
                outcome: Box::new(answered.clone()),
            }
        );
        assert_eq!(
            error.to_string(),
            "the ledger answered Expired { leases_ended: 2 } where LeaseGranted was due"
        );
        assert_eq!(
            Expired::try_from(answered).unwrap(),
            Expired { leases_ended: 2 }
        );
    }
}
