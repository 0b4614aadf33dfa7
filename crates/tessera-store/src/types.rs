//! The openraft type configuration: what a log entry carries and what applying it returns.

use std::fmt;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tessera_core::{Applied, Stamped};

/// The payload of a normal log entry: the commands the primary proposed together, each
/// stamped by it, applied in order.
///
/// Serialized as a JSON array of [`Stamped`]; a single `Stamped` object (the format before
/// commands were batched) still reads as a batch of one, so older logs load.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal(pub Vec<Stamped>);

impl Serialize for Proposal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Proposal, D::Error> {
        struct Batch;
        impl<'de> serde::de::Visitor<'de> for Batch {
            type Value = Proposal;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of stamped commands, or one stamped command")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Proposal, A::Error> {
                Vec::<Stamped>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Proposal)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Proposal, A::Error> {
                Stamped::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|stamped| Proposal(vec![stamped]))
            }
        }
        deserializer.deserialize_any(Batch)
    }
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{}@{}", one.command.name(), one.at_ms),
            many => write!(f, "{} commands", many.len()),
        }
    }
}

/// What applying an entry answers: the ledger's outcome for each command of a normal entry,
/// in order; `None` for blank and membership entries, which the ledger never sees.
pub type Response = Option<Vec<Applied>>;

openraft::declare_raft_types!(
    /// Tessera's openraft types: node ids are host numbers, a node's data is its address.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
);

pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;

#[cfg(test)]
mod tests {
    use super::Proposal;
    use tessera_core::{Command, Stamped};

    fn stamped(at_ms: i64, nonce: &str) -> Stamped {
        Stamped {
            at_ms,
            command: Command::BeginSync {
                nonce: nonce.into(),
            },
        }
    }

    #[test]
    fn a_batch_round_trips_as_an_array_and_a_single_command_reads_as_a_batch_of_one() {
        let batch = Proposal(vec![stamped(1, "a"), stamped(2, "b")]);
        let json = serde_json::to_string(&batch).unwrap();
        assert!(json.starts_with('['), "{json}");
        assert_eq!(serde_json::from_str::<Proposal>(&json).unwrap(), batch);
        // A log written before batching holds one `Stamped` object per entry.
        let old = serde_json::to_string(&stamped(3, "c")).unwrap();
        assert_eq!(
            serde_json::from_str::<Proposal>(&old).unwrap(),
            Proposal(vec![stamped(3, "c")])
        );
        let error = serde_json::from_str::<Proposal>("17").unwrap_err();
        assert!(error.to_string().contains("stamped command"), "{error}");
    }
}
