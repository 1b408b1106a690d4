//! Byte sizes with binary suffixes: `10G` is 10 GiB.

use crate::limits::{BLOCK_SIZE_BYTES, VOLUME_SIZE_BYTES_MAX};

/// Why a size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    #[error(
        "cannot parse size {input:?}: expected a number with an optional \
         K, M, G, T or P suffix (binary: 1G = 1073741824)"
    )]
    Syntax {
        /// What was given.
        input: String,
    },
    /// Zero bytes.
    #[error("size must be greater than zero")]
    Zero,
    /// Not a multiple of the block size.
    #[error("size {bytes} is not a multiple of {BLOCK_SIZE_BYTES} bytes")]
    Unaligned {
        /// The size in bytes.
        bytes: u64,
    },
    /// Larger than the limit.
    #[error("size {input} exceeds the maximum volume size of 64T")]
    TooLarge {
        /// What was given.
        input: String,
    },
}

/// Parses a volume size: bytes, or a number with a binary suffix (`K`, `M`, `G`, `T`, `P`,
/// optionally followed by `iB` or `B`). The result is a non-zero multiple of 4096 bytes no
/// larger than the volume limit.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let syntax = || SizeError::Syntax { input: input.to_owned() };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(syntax());
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(syntax()),
    };
    let too_large = || SizeError::TooLarge { input: input.to_owned() };
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    let bytes = number.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    check_size(bytes).map_err(|e| match e {
        SizeError::TooLarge { .. } => too_large(),
        other => other,
    })
}

/// Checks a size given in bytes against the same rules as [`parse_size`].
pub fn check_size(bytes: u64) -> Result<u64, SizeError> {
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    if bytes > VOLUME_SIZE_BYTES_MAX {
        return Err(SizeError::TooLarge { input: bytes.to_string() });
    }
    if !bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(SizeError::Unaligned { bytes });
    }
    Ok(bytes)
}

/// Formats bytes for humans with the largest binary suffix that divides them exactly, or
/// one decimal place otherwise (`1.5G`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 5] = [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        let scale = 1u64 << shift;
        if bytes >= scale {
            if bytes.is_multiple_of(scale) {
                return format!("{}{unit}", bytes / scale);
            }
            return format!("{:.1}{unit}", bytes as f64 / scale as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_suffixes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("64T"), Ok(64 << 40));
    }

    #[test]
    fn refuses_bad_sizes() {
        assert!(matches!(parse_size(""), Err(SizeError::Syntax { .. })));
        assert!(matches!(parse_size("G"), Err(SizeError::Syntax { .. })));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Syntax { .. })));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Syntax { .. })));
        assert!(matches!(parse_size("10X"), Err(SizeError::Syntax { .. })));
        assert_eq!(parse_size("0"), Err(SizeError::Zero));
        assert_eq!(parse_size("1000"), Err(SizeError::Unaligned { bytes: 1000 }));
        assert!(matches!(parse_size("65T"), Err(SizeError::TooLarge { .. })));
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::TooLarge { .. })));
        assert!(matches!(parse_size("16777216P"), Err(SizeError::TooLarge { .. })));
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(4096), "4K");
        assert_eq!(format_size(100), "100B");
    }
}
