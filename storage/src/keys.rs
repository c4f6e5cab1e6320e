//! Key encodings shared by the tables: parts joined by `0xff` (which never occurs in UTF-8) and
//! big-endian integers so that byte order is numeric order.

/// The separator between key parts.
pub const SEP: u8 = 0xff;

/// Joins string or byte parts with [`SEP`].
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|part| part.len() + 1).sum());
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            key.push(SEP);
        }
        key.extend_from_slice(part);
    }
    key
}

/// The prefix for all keys that start with `parts` (the parts, then a separator).
pub fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = join(parts);
    key.push(SEP);
    key
}

/// Encodes a u64 so that byte order is numeric order.
pub fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes [`encode_u64`]; `None` if the slice is not 8 bytes.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Splits a key into its parts.
pub fn split(key: &[u8]) -> Vec<&[u8]> {
    key.split(|byte| *byte == SEP).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_split_round_trip() {
        let key = join(&[b"@a:x", b"!r:x"]);
        assert_eq!(split(&key), vec![&b"@a:x"[..], b"!r:x"]);
        assert!(key.starts_with(&prefix(&[b"@a:x"])));
        assert_eq!(decode_u64(&encode_u64(42)), Some(42));
        assert!(encode_u64(1) < encode_u64(256));
    }
}
