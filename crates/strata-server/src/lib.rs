//! The few parts of the `strata` binary that decode untrusted bytes on their own, as a
//! library so that its fuzz targets (`fuzz/`) run the real code: the catalog's on-disk
//! format and the access lists it holds. Everything else lives in the binary (`main.rs`),
//! which uses these modules as its own. Forbidden here: anything that starts tasks, opens
//! sockets or touches the node's state; these modules stay leaves.

pub mod access;
pub mod catalog;
pub mod error;
