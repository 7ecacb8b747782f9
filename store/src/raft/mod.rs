//! Raft replication of partition groups, on openraft (pinned at =0.9.25, classic one leader per
//! term: feature `single-term-leader`).
//!
//! Each namespace maps Aerospike's 4096 partitions onto G groups (`group_of`); each group is an
//! openraft instance whose log lives in the node's shared WAL (`GroupLogStore`) and whose state
//! machine is the node's engine (`GroupStateMachine`).
//!
//! Invariants:
//! - **A command is applied with its log index as the record version's seq**, so replaying
//!   entries the engine already reflects (after a restart, or after a snapshot newer than its
//!   metadata says) changes nothing.
//! - **The applied point recorded in the WAL is never ahead of what the engine has made
//!   durable**: it is written only after an engine flush, when a snapshot is built or installed.
//! - **Apply is deterministic**: the leader's clock travels in the command; local limits do not
//!   refuse replicated writes (the leader checks them before proposing).

// openraft's StorageError is large, and it is what openraft's traits return.
#![allow(clippy::result_large_err)]

pub mod fences;
pub mod forget;
pub mod log_store;
pub mod range_locks;
pub mod sessions;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

pub use crate::ops::RangeLockHeld;
pub use log_store::GroupLogStore;
pub use sessions::Sessions;
pub use state_machine::{recorded_engine_points, GroupStateMachine};
pub use types::{Command, CommandResult, NodeId, Outcome, RaftInstance, Refusal, TypeConfig, WriteFailure};

pub use crate::key::group_of;
