//! The Internet checksum (RFC 1071): a ones' complement sum of 16-bit big-endian words, carried in
//! a 64-bit accumulator and folded at the end.

/// Adds `data` to `initial` (an unfolded sum). An odd last byte counts as its word's high byte.
#[inline]
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_be_bytes(w.try_into().expect("8 bytes"));
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an accumulated sum to 16 bits (not yet complemented).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The sum of the TCP/UDP pseudo-header: both addresses (4 or 16 bytes each), the protocol and
/// the transport length.
#[inline]
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], protocol: u8, len: usize) -> u64 {
    sum(src, 0) + sum(dst, 0) + u64::from(protocol) + len as u64
}
