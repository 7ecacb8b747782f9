//! Frames: the envelope of every message on a chunkstore connection (bytes in store/PROTOCOL.md).
//!
//! `decode` never panics and never allocates more than one frame's body, which is bounded by
//! the connection's `frame_bytes_max`: malformed input is a `FrameError` naming what was wrong.

/// Version byte of this protocol.
pub const PROTOCOL_VERSION: u8 = 1;
pub const FRAME_HEADER_BYTES: usize = 18;
/// Default bound on a frame body: a record (8 MiB at most) plus room for the request around it.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 9 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    /// Chosen by the sender of a request; its response carries the same id (pipelining).
    pub request_id: u64,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol version {0} (this build speaks version {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame body of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame body checksum mismatch")]
    Checksum,
}

impl Frame {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(PROTOCOL_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&self.body).to_le_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed (the header
/// is checked as soon as it is complete, so an oversized length is refused before its body
/// arrives); `Ok(Some((frame, bytes used)))` otherwise.
pub fn decode(buf: &[u8], frame_bytes_max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != PROTOCOL_VERSION {
        return Err(FrameError::Version(buf[0]));
    }
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let kind = match buf[1] {
        1 => FrameKind::Request,
        2 => FrameKind::Response,
        other => return Err(FrameError::Kind(other)),
    };
    let len = u32::from_le_bytes(buf[2..6].try_into().unwrap()) as usize;
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge { len, max: frame_bytes_max });
    }
    let total = FRAME_HEADER_BYTES + len;
    if buf.len() < total {
        return Ok(None);
    }
    let request_id = u64::from_le_bytes(buf[6..14].try_into().unwrap());
    let crc = u32::from_le_bytes(buf[14..18].try_into().unwrap());
    let body = &buf[FRAME_HEADER_BYTES..total];
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(Some((Frame { kind, request_id, body: body.to_vec() }, total)))
}
