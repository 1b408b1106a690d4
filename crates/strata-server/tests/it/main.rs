//! Integration tests: the real `strata up` binary on free loopback ports, driven by real
//! NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and by a raw-socket client for
//! the malformed input real clients refuse to send. Missing client tools fail the tests:
//! `.ci/run` installs them.

mod api_cli;
mod api_fuzz;
mod bad_input;
mod clients;
mod cluster;
mod dashboard;
mod dataplane;
mod durability;
mod file_modes;
mod full_disk;
mod harness;
mod help;
mod http_api;
mod logs;
mod metrics;
mod nbd_bounds;
mod nbd_tls;
mod raw;
mod reclaim;
mod snapshots;
