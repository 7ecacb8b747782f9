//! The wire protocol lives in the client crate (`chunkstore_client::protocol`: frames and
//! messages, bytes in store/PROTOCOL.md); re-exported here for the server's code.

pub use chunkstore_client::protocol::*;
