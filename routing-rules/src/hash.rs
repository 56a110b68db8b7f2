//! The hash functions that place users. They are part of the public contract
//! (see `docs/hash.md`): changing any output moves users between cells, so
//! golden tests pin them.
//!
//! Hash version 1:
//! - xxh64 slot: `xxh64(key bytes, seed 0) mod slots`;
//! - digits slot: the decimal number formed by `count` digits ending `skip`
//!   digits before the end of the key, `mod slots`;
//! - colour bucket: `xxh64(key bytes, seed = rollout seed) mod 10000`.

use xxhash_rust::xxh64::xxh64;

use crate::model::{HashAlgorithm, BASIS_POINTS, MAX_KEY_LEN};

/// Version of the hash contract implemented here.
pub const HASH_VERSION: u32 = 1;

/// Why a key could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// No key in the request.
    Missing,
    /// Empty, longer than [`MAX_KEY_LEN`] bytes, or contains control characters.
    Malformed,
    /// `digits` hashing and the key is not all digits or too short.
    NotDigits,
}

impl KeyProblem {
    /// Short machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyProblem::Missing => "missing",
            KeyProblem::Malformed => "malformed",
            KeyProblem::NotDigits => "not-digits",
        }
    }
}

/// Checks the generic shape of a key: 1..=256 bytes, no control characters.
#[inline]
pub fn check_key(key: &[u8]) -> Result<(), KeyProblem> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.iter().any(|b| b.is_ascii_control()) {
        Err(KeyProblem::Malformed)
    } else {
        Ok(())
    }
}

/// `xxh64(key, 0) mod slots`.
///
/// ```
/// assert_eq!(routing_rules::hash::xxh64_slot(b"alice", 100), 89);
/// ```
#[inline]
pub fn xxh64_slot(key: &[u8], slots: u32) -> u32 {
    (xxh64(key, 0) % slots as u64) as u32
}

/// The slot of a `digits` key, or `NotDigits`.
///
/// ```
/// use routing_rules::hash::digits_slot;
/// assert_eq!(digits_slot(b"2088000012345678", 2, 0, 100), Ok(78));
/// assert_eq!(digits_slot(b"2088000012345678", 2, 2, 100), Ok(56));
/// ```
#[inline]
pub fn digits_slot(key: &[u8], count: u8, skip: u8, slots: u32) -> Result<u32, KeyProblem> {
    if !key.iter().all(u8::is_ascii_digit) {
        return Err(KeyProblem::NotDigits);
    }
    let need = count as usize + skip as usize;
    if key.len() < need {
        return Err(KeyProblem::NotDigits);
    }
    let end = key.len() - skip as usize;
    let mut n: u64 = 0;
    for &d in &key[end - count as usize..end] {
        n = n * 10 + (d - b'0') as u64;
    }
    Ok((n % slots as u64) as u32)
}

/// The slot of `key` under `hash` with `slots` slots.
#[inline]
pub fn slot_of(hash: HashAlgorithm, key: &[u8], slots: u32) -> Result<u32, KeyProblem> {
    check_key(key)?;
    match hash {
        HashAlgorithm::Xxh64 => Ok(xxh64_slot(key, slots)),
        HashAlgorithm::Digits { count, skip } => digits_slot(key, count, skip, slots),
    }
}

/// Sticky colour bucket in 0..10000: `xxh64(key, seed) mod 10000`. A user is
/// green when `bucket < green share (basis points)`.
///
/// ```
/// assert_eq!(routing_rules::hash::colour_bucket(b"alice", 0), 9289);
/// ```
#[inline]
pub fn colour_bucket(key: &[u8], seed: u64) -> u32 {
    (xxh64(key, seed) % BASIS_POINTS as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_keys() {
        assert_eq!(check_key(b""), Err(KeyProblem::Malformed));
        assert_eq!(check_key(b"a\nb"), Err(KeyProblem::Malformed));
        assert_eq!(check_key(&[b'a'; 257]), Err(KeyProblem::Malformed));
        assert_eq!(check_key(&[b'a'; 256]), Ok(()));
    }

    #[test]
    fn digits_rejects_non_numeric_and_short() {
        assert_eq!(digits_slot(b"12a4", 2, 0, 100), Err(KeyProblem::NotDigits));
        assert_eq!(digits_slot(b"1", 2, 0, 100), Err(KeyProblem::NotDigits));
        assert_eq!(digits_slot(b"123", 2, 1, 100), Ok(12));
        assert_eq!(digits_slot(b"199", 2, 0, 10), Ok(9));
    }
}
