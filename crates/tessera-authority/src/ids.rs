//! Identifiers the authority hands out: license server IDs and key ids, both random.
//!
//! A server ID is `LS-XXXX-XXXX`: 8 symbols of Crockford's base32 alphabet (no I, L, O, U, so
//! it survives being read aloud or typed from a printed letter), 40 random bits. It is not a
//! secret (the binding to a key pair protects it); randomness only keeps IDs from being
//! guessable in sequence and from revealing how many customers the vendor has.

/// Crockford's base32 alphabet.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
pub const SERVER_ID_PREFIX: &str = "LS-";
/// `LS-` + 4 + `-` + 4.
pub const SERVER_ID_LENGTH: usize = 12;

/// Formats 40 bits (the 5 bytes given) as `LS-XXXX-XXXX`.
pub fn format_server_id(bits: [u8; 5]) -> String {
    let mut value = bits.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let mut symbols = [0u8; 8];
    for symbol in symbols.iter_mut().rev() {
        *symbol = ALPHABET[(value & 31) as usize];
        value >>= 5;
    }
    let text = std::str::from_utf8(&symbols).expect("alphabet is ASCII");
    format!("{SERVER_ID_PREFIX}{}-{}", &text[..4], &text[4..])
}

/// True if `text` has the exact shape of a server ID (uppercase).
pub fn is_server_id(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == SERVER_ID_LENGTH
        && text.starts_with(SERVER_ID_PREFIX)
        && bytes[7] == b'-'
        && bytes[3..7]
            .iter()
            .chain(&bytes[8..])
            .all(|b| ALPHABET.contains(b))
}

/// A server ID as typed by a person: trimmed and uppercased, so `ls-abcd-efgh` works.
pub fn normalize_server_id(text: &str) -> String {
    text.trim().to_ascii_uppercase()
}

/// Formats a key id: `K-` and 12 uppercase hex digits (48 bits).
pub fn format_key_id(bits: [u8; 6]) -> String {
    format!("K-{}", hex::encode_upper(bits))
}

pub fn random_server_id() -> Result<String, getrandom::Error> {
    let mut bits = [0u8; 5];
    getrandom::fill(&mut bits)?;
    Ok(format_server_id(bits))
}

pub fn random_key_id() -> Result<String, getrandom::Error> {
    let mut bits = [0u8; 6];
    getrandom::fill(&mut bits)?;
    Ok(format_key_id(bits))
}

/// 32 random bytes as 64 hex digits: the admin token.
pub fn random_token() -> Result<String, getrandom::Error> {
    let mut bits = [0u8; 32];
    getrandom::fill(&mut bits)?;
    Ok(hex::encode(bits))
}

/// Compares two secrets in time independent of where they differ, so the admin token cannot
/// be found a byte at a time by timing refusals.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids_have_the_documented_shape() {
        assert_eq!(format_server_id([0; 5]), "LS-0000-0000");
        assert_eq!(format_server_id([0xff; 5]), "LS-ZZZZ-ZZZZ");
        // 40 bits, most significant first: 1 in the last symbol.
        assert_eq!(format_server_id([0, 0, 0, 0, 1]), "LS-0000-0001");
        for bits in [[0; 5], [0xff; 5], [1, 2, 3, 4, 5], [0xa5; 5]] {
            assert!(is_server_id(&format_server_id(bits)));
        }
        let random = random_server_id().unwrap();
        assert!(is_server_id(&random), "{random}");
    }

    #[test]
    fn look_alike_and_malformed_server_ids_are_not_ids() {
        for text in [
            "",
            "LS-0000-000",
            "LS-0000-00000",
            "LS-0000_0000",
            "ls-0000-0000",
            "LS-000I-0000",
            "LS-000O-0000",
            "LS-000U-0000",
            "XX-0000-0000",
            "LS-0000-000é",
        ] {
            assert!(!is_server_id(text), "{text:?}");
        }
        assert_eq!(normalize_server_id(" ls-abcd-efgh\n"), "LS-ABCD-EFGH");
    }

    #[test]
    fn key_ids_and_tokens_have_their_lengths() {
        assert_eq!(format_key_id([0xab; 6]), "K-ABABABABABAB");
        assert!(tessera_core::key::is_name(&random_key_id().unwrap()));
        let token = random_token().unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn constant_time_eq_compares_whole_secrets() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret-longer"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
