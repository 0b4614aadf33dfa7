//! The openraft type configuration: what a log entry carries and what applying it returns.

use std::fmt;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tessera_core::{Applied, Stamped};

/// The payload of a normal log entry: one command stamped by the primary.
///
/// A newtype only because openraft wants `Display` on entry payloads; it serializes exactly
/// as the [`Stamped`] inside.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Proposal(pub Stamped);

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.0.command.name(), self.0.at_ms)
    }
}

/// What applying an entry answers: the ledger's outcome for a normal entry, `None` for blank
/// and membership entries, which the ledger never sees.
pub type Response = Option<Applied>;

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
