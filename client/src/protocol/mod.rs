//! The wire protocol: versioned, length-prefixed frames with request ids for pipelining
//! (`frame.rs`), carrying bincode-encoded messages (`messages.rs`). Bytes: store/PROTOCOL.md.
//!
//! Invariants: **decoding never panics and never allocates more than the frame limit**; a
//! frame that fails to decode ends the connection with a logged reason.

pub mod frame;
pub mod messages;

pub use frame::{decode as decode_frame, Frame, FrameError, FrameKind, FRAME_BYTES_MAX_DEFAULT};
pub use messages::{decode_body, encode_body, ClusterMap, ErrorReply, MoveStage, NamespaceMap, ReadPolicy, Request, Response, WriteTag};
