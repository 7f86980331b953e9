//! Reading the recordings' WAV files in tests: the header, the two channels (the μ-law kept
//! as it was carried), and μ-law audio decoded independently of the crate's table, to find
//! what was sent in what was recorded.

/// Bytes of the WAV header.
pub const HEADER: usize = 44;

/// G.711 μ-law expansion, written out independently of the crate's table.
pub fn ulaw(b: u8) -> i16 {
    let u = !b;
    let t = ((((u & 0x0F) as i32) << 3) + 0x84) << ((u >> 4) & 7);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

pub fn decoded(mulaw: &[u8]) -> Vec<i16> {
    mulaw.iter().map(|&b| ulaw(b)).collect()
}

/// The format tag of 16-bit PCM (the simulator's files).
pub const PCM: u16 = 1;
/// The format tag of G.711 μ-law (the Worker's recordings).
pub const MULAW: u16 = 7;

/// The WAV's format tag.
pub fn format_tag(wav: &[u8]) -> u16 {
    u16::from_le_bytes([wav[20], wav[21]])
}

/// The parsed 44-byte header: (channels, rate, byte rate, block align, bits, data size).
pub fn parse_header(wav: &[u8]) -> (u16, u32, u32, u16, u16, u32) {
    assert!(wav.len() >= HEADER, "{} bytes", wav.len());
    let u16_at = |i: usize| u16::from_le_bytes([wav[i], wav[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(wav[i..i + 4].try_into().unwrap());
    assert_eq!(&wav[0..4], b"RIFF");
    assert_eq!(u32_at(4) as usize, wav.len() - 8, "RIFF size");
    assert_eq!(&wav[8..16], b"WAVEfmt ");
    assert_eq!(u32_at(16), 16, "fmt chunk size");
    assert!(
        matches!(format_tag(wav), PCM | MULAW),
        "format {}",
        format_tag(wav)
    );
    assert_eq!(&wav[36..40], b"data");
    (
        u16_at(22),
        u32_at(24),
        u32_at(28),
        u16_at(32),
        u16_at(34),
        u32_at(40),
    )
}

/// (left, right) samples of a stereo WAV's data: μ-law decoded, or 16-bit PCM.
pub fn channels(wav: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let data = &wav[HEADER..];
    match format_tag(wav) {
        MULAW => {
            assert_eq!(data.len() % 2, 0, "whole stereo frames");
            data.chunks(2).map(|f| (ulaw(f[0]), ulaw(f[1]))).unzip()
        }
        _ => {
            assert_eq!(data.len() % 4, 0, "whole stereo frames");
            data.chunks(4)
                .map(|f| {
                    (
                        i16::from_le_bytes([f[0], f[1]]),
                        i16::from_le_bytes([f[2], f[3]]),
                    )
                })
                .unzip()
        }
    }
}

pub fn find(haystack: &[i16], needle: &[i16], from: usize) -> Option<usize> {
    (from..haystack.len().saturating_sub(needle.len() - 1))
        .find(|&i| haystack[i..i + needle.len()] == *needle)
}
