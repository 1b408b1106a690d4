//! The space a node keeps free on its data directory's file system (`reserve`): client
//! writes are refused with ENOSPC before the file system is full, so that the store's
//! own journal, checkpoints and cleaner, the metadata service and deletes always have
//! room (the way Ceph's full ratios keep an OSD writable for recovery and deletes).

/// The reserve when none is configured: 5 % of the file system, at least
/// [`RESERVE_FLOOR_BYTES`].
pub const RESERVE_DEFAULT: Reserve = Reserve::Percent(5);

/// The smallest reserve (unless the file system is small, see [`Reserve::bytes_of`]):
/// a cleaner pass (4 segments of at most 8 MiB live each), two checkpoints (the old one
/// and its replacement), the metadata service's database growing between compactions,
/// and the journal records of deletes and trims.
pub const RESERVE_FLOOR_BYTES: u64 = 64 << 20;

/// How much of the file system to keep free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage of the file system's size (1..=50).
    Percent(u8),
}

/// Why a reserve was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "cannot parse reserve {input:?}: expected a size (512M, 1G) or a percentage of the \
     file system from 1% to 50% (5%)"
)]
pub struct ReserveError {
    /// What was given.
    pub input: String,
}

impl Reserve {
    /// Parses `1G`, `512M`, `1073741824` or `5%`.
    pub fn parse(input: &str) -> Result<Reserve, ReserveError> {
        let error = || ReserveError { input: input.to_owned() };
        let s = input.trim();
        if let Some(percent) = s.strip_suffix('%') {
            let p: u8 = percent.trim().parse().map_err(|_| error())?;
            return if (1..=50).contains(&p) { Ok(Reserve::Percent(p)) } else { Err(error()) };
        }
        crate::parse_size(s).map(Reserve::Bytes).map_err(|_| error())
    }

    /// The reserve in bytes on a file system of `size_bytes`: at least
    /// [`RESERVE_FLOOR_BYTES`], but never more than half the file system (a tiny one
    /// still takes some data).
    pub fn bytes_of(self, size_bytes: u64) -> u64 {
        let asked = match self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => size_bytes / 100 * u64::from(p),
        };
        asked.max(RESERVE_FLOOR_BYTES).min(size_bytes / 2)
    }
}

impl std::fmt::Display for Reserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reserve::Bytes(b) => f.write_str(&crate::format_size(*b)),
            Reserve::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages_parse_and_bad_ones_are_refused() {
        assert_eq!(Reserve::parse("1G"), Ok(Reserve::Bytes(1 << 30)));
        assert_eq!(Reserve::parse(" 5% "), Ok(Reserve::Percent(5)));
        for bad in ["", "0%", "51%", "-1%", "x", "1.5%", "0"] {
            assert!(Reserve::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_reserve_has_a_floor_and_never_takes_more_than_half() {
        let gib = 1u64 << 30;
        assert_eq!(Reserve::Percent(5).bytes_of(1000 * gib), 50 * gib);
        assert_eq!(Reserve::Percent(5).bytes_of(gib), RESERVE_FLOOR_BYTES);
        assert_eq!(Reserve::Bytes(gib).bytes_of(300 << 20), 150 << 20);
        assert_eq!(Reserve::Bytes(2 * gib).bytes_of(100 * gib), 2 * gib);
    }
}
