//! Every bound in Strata, in one place.

/// The block size of a volume: sizes are multiples of it, and it is the preferred I/O size.
pub const BLOCK_SIZE_BYTES: u64 = 4096;

/// The largest volume: 64 TiB. Keeps byte offsets far from u64 overflow and bounds metadata.
pub const VOLUME_SIZE_BYTES_MAX: u64 = 64 << 40;

/// Volume names: 1..=64 characters.
pub const VOLUME_NAME_LENGTH_MAX: usize = 64;

/// The most volumes one node holds in this version.
pub const VOLUMES_MAX: usize = 4096;

/// The largest NBD READ or WRITE payload we accept; advertised as the maximum payload.
/// 32 MiB is the spec's interoperability figure (every client keeps under it).
pub const NBD_PAYLOAD_BYTES_MAX: u32 = 32 << 20;

/// A WRITE payload above the maximum but at most this is read and discarded (EINVAL);
/// anything larger is treated as an attack and the connection is closed.
pub const NBD_PAYLOAD_DISCARD_BYTES_MAX: u32 = 128 << 20;

/// The largest option (handshake) payload we read. Names are at most 4096 bytes by spec;
/// meta-context queries add a little.
pub const NBD_OPTION_BYTES_MAX: u32 = 64 << 10;

/// The most option requests one handshake may send before we give up on the client.
pub const NBD_OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;

/// Requests in flight per NBD connection; the reader stops reading when this many wait.
pub const NBD_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Payload bytes of the requests one NBD connection has in flight; the reader stops
/// parsing at this many. With the request limit it bounds a connection's buffers.
pub const NBD_IN_FLIGHT_BYTES_MAX: u64 = 128 << 20;

/// Extents returned in one BLOCK_STATUS reply (the spec suggests at most 2^20).
pub const NBD_BLOCK_STATUS_EXTENTS_MAX: usize = 4096;

/// Concurrent NBD connections per node.
pub const NBD_CONNECTIONS_MAX: usize = 1024;

/// Bytes of one inter-node handshake message read before the peer is authenticated (the
/// Noise NNpsk0 messages are 48 bytes; anything longer is not a Strata node).
pub const INTERNODE_HANDSHAKE_BYTES_MAX: usize = 256;

/// How long an inter-node handshake may take, from accept to authenticated: long enough
/// for a loaded node on a slow link, short enough that stalled connections free their
/// slots (`INTERNODE_UNAUTHENTICATED_MAX`) quickly.
pub const INTERNODE_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Inter-node connections accepted but not yet authenticated, per node; beyond it new
/// ones are closed at once (a flood of stalled connections costs a socket each, never
/// memory or a task beyond this).
pub const INTERNODE_UNAUTHENTICATED_MAX: usize = 512;

/// Of those, from one source address: a single flooding host cannot take the slots the
/// other nodes need to reconnect.
pub const INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX: usize = 64;

/// The largest record of the inter-node channel, its tag included (Noise's message limit).
pub const INTERNODE_RECORD_BYTES_MAX: usize = 65_535;

/// Source addresses whose refusals are remembered for rate-limiting their log lines.
pub const INTERNODE_REFUSAL_SOURCES_MAX: usize = 4096;

const _: () = assert!(VOLUME_SIZE_BYTES_MAX.is_multiple_of(BLOCK_SIZE_BYTES));
/// NBD connections one client address may hold at once: beyond it new ones are closed at
/// once, so one host cannot take every connection of the node (multi-conn clients open
/// a few each: qemu and nbdcopy use at most 16).
pub const NBD_CONNECTIONS_PER_ADDRESS_MAX: usize = 64;
/// Reply bytes one NBD connection may hold (queued, or being read for a request in
/// flight): at the bound it stops reading requests, so a client that sends READs and
/// never reads the replies costs this much memory, not the sum of its requests.
pub const NBD_REPLY_BYTES_MAX: u64 = 64 << 20;
/// Seconds an unauthenticated NBD client has for the TLS handshake after STARTTLS.
pub const NBD_TLS_HANDSHAKE_SECS: u64 = 10;
/// The default of `nbd_idle_timeout_secs` (an NBD connection with no request in flight
/// and none arriving for that long is closed): 0, never. A VM's disk may sit idle for days,
/// and qemu without `reconnect-delay` fails the guest's next I/O on a closed connection;
/// a client that vanished is found by TCP keepalive instead ([`NBD_KEEPALIVE_IDLE_SECS`]).
pub const NBD_IDLE_TIMEOUT_SECS_DEFAULT: u64 = 0;
/// TCP keepalive on NBD connections: probes start after this many idle seconds, one every
/// [`NBD_KEEPALIVE_INTERVAL_SECS`], and after [`NBD_KEEPALIVE_PROBES`] unanswered the
/// kernel closes the connection: a client whose machine died or whose network went away
/// frees its connection within about two minutes, whatever `nbd_idle_timeout_secs` says.
pub const NBD_KEEPALIVE_IDLE_SECS: u64 = 60;
/// See [`NBD_KEEPALIVE_IDLE_SECS`].
pub const NBD_KEEPALIVE_INTERVAL_SECS: u64 = 10;
/// See [`NBD_KEEPALIVE_IDLE_SECS`].
pub const NBD_KEEPALIVE_PROBES: u32 = 6;

const _: () = assert!(NBD_PAYLOAD_BYTES_MAX as u64 >= BLOCK_SIZE_BYTES);
const _: () = assert!(NBD_PAYLOAD_DISCARD_BYTES_MAX >= NBD_PAYLOAD_BYTES_MAX);
const _: () = assert!(NBD_BLOCK_STATUS_EXTENTS_MAX <= 1 << 20);
const _: () = assert!(NBD_IN_FLIGHT_BYTES_MAX >= NBD_PAYLOAD_BYTES_MAX as u64);
const _: () = assert!(NBD_REPLY_BYTES_MAX >= 2 * NBD_PAYLOAD_BYTES_MAX as u64);
const _: () = assert!(NBD_CONNECTIONS_PER_ADDRESS_MAX <= NBD_CONNECTIONS_MAX);
const _: () = assert!(INTERNODE_UNAUTHENTICATED_PER_SOURCE_MAX <= INTERNODE_UNAUTHENTICATED_MAX);
const _: () = assert!(INTERNODE_HANDSHAKE_BYTES_MAX < INTERNODE_RECORD_BYTES_MAX);
