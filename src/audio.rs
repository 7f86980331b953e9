//! Facts about the audio the bridge relays: G.711 μ-law at 8 kHz mono, base64 on the wire
//! on both sides. The bridge never decodes audio on the relay path; it only needs to know
//! how many bytes (and so how many milliseconds) a payload holds, and that a payload is
//! plain base64 so it can be embedded in JSON without re-encoding.

/// μ-law at 8000 samples/s, one byte per sample: 8 bytes per millisecond.
pub const BYTES_PER_MS: u64 = 8;

/// Converts a count of μ-law bytes to whole milliseconds (floor).
pub fn bytes_to_ms(bytes: u64) -> u64 {
    bytes / BYTES_PER_MS
}

/// Validates standard padded base64 and returns how many bytes it decodes to.
///
/// Returns `None` for anything that is not canonical-shape base64 (wrong alphabet, length
/// not a multiple of 4, padding in the middle). Because the alphabet excludes `"` and `\`,
/// a payload that passes can be copied into a JSON string verbatim.
pub fn base64_decoded_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let pad = match b {
        [.., b'=', b'='] => 2,
        [.., b'='] => 1,
        _ => 0,
    };
    let body = &b[..b.len() - pad];
    if !body
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    {
        return None;
    }
    Some(b.len() / 4 * 3 - pad)
}

/// Standard base64 as [`base64_decoded_len`] accepts it: padded, with whatever the unused
/// bits of the last character hold.
const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// Appends to `buf` the bytes the base64 `s` holds; false, and `buf` as it was, when `s` is
/// not base64.
pub fn base64_decode_into(s: &str, buf: &mut Vec<u8>) -> bool {
    use base64::Engine as _;
    let len = buf.len();
    let ok = LENIENT.decode_vec(s, buf).is_ok();
    if !ok {
        buf.truncate(len);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn decoded_len_matches_a_real_decoder() {
        let engine = base64::engine::general_purpose::STANDARD;
        for n in 0..50usize {
            let data: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            let text = engine.encode(&data);
            assert_eq!(base64_decoded_len(&text), Some(n), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_base64() {
        for bad in [
            "abc", "ab=c", "a\"bc", "ab\\c", "ab c", "=abc", "a===", "éabc",
        ] {
            assert_eq!(base64_decoded_len(bad), None, "{bad}");
        }
    }

    #[test]
    fn decoding_appends_and_leaves_the_buffer_as_it_was_on_failure() {
        let mut buf = vec![1, 2];
        assert!(base64_decode_into("AwQ=", &mut buf));
        assert_eq!(buf, [1, 2, 3, 4]);
        for bad in ["abc", "ab=c", "a\"bc", "=abc"] {
            assert!(!base64_decode_into(bad, &mut buf), "{bad}");
            assert_eq!(buf, [1, 2, 3, 4], "{bad}");
        }
        // Every payload the check accepts decodes, unused bits and all ("AR==" holds 0x01
        // with one bit set past it).
        assert_eq!(base64_decoded_len("AR=="), Some(1));
        assert!(base64_decode_into("AR==", &mut buf));
        assert_eq!(buf, [1, 2, 3, 4, 1]);
    }

    #[test]
    fn twenty_ms_frame() {
        assert_eq!(bytes_to_ms(160), 20);
        assert_eq!(bytes_to_ms(167), 20);
    }
}
