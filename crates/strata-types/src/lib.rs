//! Strata's shared vocabulary: volume names, byte sizes, limits, stable error codes, and
//! the data of a volume's NBD access list (`AccessList`).
//!
//! Every other crate depends on this one; it depends on no other Strata crate and does no I/O.
//! Limits live here as constants with compile-time checks so that every queue, buffer and
//! payload in the system has a bound that can be read in one place.

mod access;
pub mod le;
pub mod limits;
mod name;
mod reserve;
mod size;

pub use access::AccessList;
pub use name::{NameError, VolumeName};
pub use reserve::{Reserve, ReserveError, RESERVE_DEFAULT, RESERVE_FLOOR_BYTES};
pub use size::{check_size, format_size, parse_size, SizeError};

/// A stable, machine-readable error code, mapped once to an HTTP status, an NBD errno
/// and an exit code. The string form is part of the API contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request was malformed or a value is out of range.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object with that name already exists.
    AlreadyExists,
    /// The object is in use (e.g. a volume with NBD clients attached).
    Busy,
    /// The request is well formed but the object's state refuses it (e.g. shrinking a
    /// volume without allowing it, moving a volume of one copy, removing the last node).
    Conflict,
    /// The store has no space left.
    NoSpace,
    /// An I/O error or a detected corruption.
    Io,
    /// A bug or an unexpected state.
    Internal,
    /// The cluster cannot serve it now (no metadata quorum, a peer unreachable); or the
    /// outcome of a request is unknown. Retry later.
    Unavailable,
    /// The request lacks the API's bearer token.
    Unauthorized,
}

impl ErrorCode {
    /// The stable string used in API error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Busy => "busy",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::Io => "io_error",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }

    /// The HTTP status for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Busy | ErrorCode::Conflict => 409,
            ErrorCode::NoSpace => 507,
            ErrorCode::Io | ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::Unauthorized => 401,
        }
    }
}
