//! Little-endian fields of on-disk formats: every disk integer in Strata is explicit
//! little-endian (`usize` never goes to disk).
//!
//! Each reader takes a slice and an offset the caller has already checked against the
//! slice's length; an offset out of range is a bug in the format code and panics.

/// The `u16` at `at`.
pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

/// The `u32` at `at`.
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The `u64` at `at`.
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_little_endian() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(super::u16_at(&b, 1), 0x0302);
        assert_eq!(super::u32_at(&b, 0), 0x0403_0201);
        assert_eq!(super::u64_at(&b, 1), 0x0908_0706_0504_0302);
    }
}
