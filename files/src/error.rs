//! The file layer's one error enum, and the one mapping from the client's errors to it.
//! Fronts turn an `FsError` into an errno with `FsError::errno` and nowhere else.

use chunkstore_client::client::ClientError;
use chunkstore_client::protocol::ErrorReply;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name is {0} bytes, the limit is 255")]
    NameTooLong(usize),
    #[error("file would pass the largest file size ({0} bytes)")]
    FileTooBig(u64),
    #[error("too many links ({0})")]
    TooManyLinks(u32),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// stop-writes, or a directory past the record size limit: nothing was written.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The cluster could not be reached, or a write's outcome stays unknown after the client's
    /// exactly-once retries, or the write was refused because the mount's lease session was
    /// fenced: the caller must not take the write for done.
    #[error("I/O error: {0}")]
    Io(String),
    /// A record of the volume does not decode: the volume needs `chunkctl fs fsck`.
    #[error("corrupt volume record: {0}")]
    Corrupt(String),
    /// Another writer changed the record between our read and our write: retried inside the
    /// file layer, never returned to a front.
    #[error("conflict with another writer")]
    Conflict,
    #[error("lock held by another owner")]
    WouldBlock,
}

impl FsError {
    /// The errno a front answers for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong(_) => libc::ENAMETOOLONG,
            FsError::FileTooBig(_) => libc::EFBIG,
            FsError::TooManyLinks(_) => libc::EMLINK,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Io(_) | FsError::Corrupt(_) | FsError::Conflict => libc::EIO,
            FsError::WouldBlock => libc::EAGAIN,
        }
    }
}

impl From<ClientError> for FsError {
    fn from(err: ClientError) -> FsError {
        match err {
            ClientError::Server(ErrorReply::StopWrites(reason)) => FsError::NoSpace(reason),
            ClientError::Server(ErrorReply::DeviceOverload(reason)) => FsError::Io(format!("device overload: {reason}")),
            ClientError::Server(ErrorReply::RecordTooBig { size_bytes, limit_bytes }) => {
                FsError::NoSpace(format!("a record of {size_bytes} bytes passes the limit of {limit_bytes} (a directory with too many entries?)"))
            }
            ClientError::Server(ErrorReply::GenerationMismatch { .. }) => FsError::Conflict,
            other => FsError::Io(other.to_string()),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
