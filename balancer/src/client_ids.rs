//! [`ClientIds`]: the hasher of a client connection's map of request ids.
//!
//! The ids are the client's choice, so the hash must be keyed: with a known hash, a client
//! could pick ids that all fall in one bucket and make every lookup on its connection walk
//! them all, on a thread other clients share. SipHash (std's `RandomState`) is keyed but
//! cost about 350 instructions per frame (three lookups: read, sent, answered) of the
//! balancer's ~11,000. A folded multiply (the 128-bit product of the id, mixed with one
//! random key, by a second random key, its halves XORed: foldhash's and aHash's fallback
//! construction) is keyed as well, per connection, and costs a handful. The map holds at
//! most `--max-client-in-flight` ids and only its own connection's.

use std::hash::{BuildHasher, Hasher};

/// Builds the hasher of one connection's id map: two random keys, drawn per connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientIds {
    mix: u64,
    multiply: u64,
}

impl ClientIds {
    /// Fresh random keys.
    pub(crate) fn new() -> ClientIds {
        ClientIds {
            mix: rand::random(),
            // Odd, so that the multiply loses no bit of the id.
            multiply: rand::random::<u64>() | 1,
        }
    }
}

impl BuildHasher for ClientIds {
    type Hasher = IdHash;

    fn build_hasher(&self) -> IdHash {
        IdHash {
            state: self.mix,
            multiply: self.multiply,
        }
    }
}

/// The hasher [`ClientIds`] builds.
#[derive(Debug)]
pub(crate) struct IdHash {
    state: u64,
    multiply: u64,
}

impl IdHash {
    fn fold(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(self.multiply);
        // Truncations meant: the two halves of the product, folded into one.
        #[allow(clippy::cast_possible_truncation)]
        let (low, high) = (product as u64, (product >> 64) as u64);
        self.state = low ^ high;
    }
}

impl Hasher for IdHash {
    fn write(&mut self, bytes: &[u8]) {
        // Ids hash through `write_u64`; anything else, eight bytes at a time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.fold(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.fold(id);
    }

    fn finish(&self) -> u64 {
        // One fold leaves the product's low bits a function of the id's low bits alone (plus
        // whatever the high half XORs in), and the table indexes by the low bits: ids that
        // differ only in their high bits then crowd few buckets for some keys (62 of 256 in
        // one draw in nine). A second fold of the rotated state spreads every bit of the id
        // over the low bits too.
        let product = u128::from(self.state.rotate_left(32)) * u128::from(self.multiply);
        // Truncations meant, as in `fold`.
        #[allow(clippy::cast_possible_truncation)]
        let (low, high) = (product as u64, (product >> 64) as u64);
        low ^ high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hash_apart_and_keys_differ_per_connection() {
        let (a, b) = (ClientIds::new(), ClientIds::new());
        assert_ne!(
            a.hash_one(7u64),
            b.hash_one(7u64),
            "keys are drawn per connection"
        );
        // Ids that differ only in their high bits (a client's attempt at one bucket) still
        // spread over the low bits the table indexes by.
        let buckets: std::collections::HashSet<u64> =
            (0..256u64).map(|k| a.hash_one(k << 48) & 0xff).collect();
        assert!(buckets.len() > 128, "{} buckets of 256", buckets.len());
        assert_eq!(a.hash_one(42u64), a.hash_one(42u64));
    }

    #[test]
    fn high_bit_ids_spread_for_every_key_drawn() {
        // A well-mixed hash puts 256 ids in about 162 of 256 buckets (1 - 1/e), give or take
        // 5; with one fold, some keys gave 62. Many draws, so a weak key shows up here.
        for _ in 0..2_000 {
            let ids = ClientIds::new();
            for shift in [32u32, 40, 48, 56] {
                let buckets: std::collections::HashSet<u64> = (0..256u64)
                    .map(|k| ids.hash_one(k << shift) & 0xff)
                    .collect();
                assert!(
                    buckets.len() > 128,
                    "{} buckets of 256 (shift {shift}, {ids:?})",
                    buckets.len()
                );
            }
        }
    }
}
