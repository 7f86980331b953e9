//! Reading the recordings' WAV files in tests: the header, the two channels (the μ-law kept
//! as it was carried), and μ-law audio decoded independently of the crate's table, to find
//! what was sent in what was recorded.

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

/// The little-endian `u16` at byte `i`.
fn u16_at(wav: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([wav[i], wav[i + 1]])
}

/// The little-endian `u32` at byte `i`.
fn u32_at(wav: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(wav[i..i + 4].try_into().unwrap())
}

/// The WAV's format tag.
pub fn format_tag(wav: &[u8]) -> u16 {
    u16_at(wav, 20)
}

/// Where the `data` chunk's samples start, after checking the chunks before it: `RIFF` with
/// the file's size, `WAVE`, then `fmt ` (PCM's 16 bytes; for μ-law the 18 of a
/// `WAVEFORMATEX` with no extra bytes, and a `fact` chunk giving the length in sample frames,
/// as the WAV spec asks of every format but PCM), then `data`, to the end of the file.
pub fn data_offset(wav: &[u8]) -> usize {
    assert!(wav.len() >= 44, "{} bytes", wav.len());
    assert_eq!(&wav[0..4], b"RIFF");
    assert_eq!(u32_at(wav, 4) as usize, wav.len() - 8, "RIFF size");
    assert_eq!(&wav[8..16], b"WAVEfmt ");
    let fmt_size = u32_at(wav, 16) as usize;
    let fact_at = 20 + fmt_size;
    let data_at = match format_tag(wav) {
        PCM => {
            assert_eq!(fmt_size, 16, "PCM's fmt chunk size");
            fact_at
        }
        MULAW => {
            assert_eq!(fmt_size, 18, "μ-law's fmt chunk size (a WAVEFORMATEX)");
            assert_eq!(u16_at(wav, 36), 0, "cbSize: no extra format bytes");
            assert_eq!(
                &wav[fact_at..fact_at + 4],
                b"fact",
                "a fact chunk after fmt"
            );
            assert_eq!(u32_at(wav, fact_at + 4), 4, "fact chunk size");
            fact_at + 12
        }
        other => panic!("format {other}"),
    };
    assert_eq!(&wav[data_at..data_at + 4], b"data");
    let data_bytes = u32_at(wav, data_at + 4) as usize;
    assert_eq!(
        data_bytes,
        wav.len() - data_at - 8,
        "the data chunk runs to the end"
    );
    if format_tag(wav) == MULAW {
        let block_align = u16_at(wav, 32) as usize;
        assert_eq!(
            u32_at(wav, fact_at + 8) as usize,
            data_bytes / block_align,
            "fact: the length in sample frames"
        );
    }
    data_at + 8
}

/// The samples: the `data` chunk's contents (see [`data_offset`]).
pub fn data(wav: &[u8]) -> &[u8] {
    &wav[data_offset(wav)..]
}

/// The header's fields, checked (see [`data_offset`]): (channels, rate, byte rate, block
/// align, bits, data size).
pub fn parse_header(wav: &[u8]) -> (u16, u32, u32, u16, u16, u32) {
    let data_at = data_offset(wav);
    (
        u16_at(wav, 22),
        u32_at(wav, 24),
        u32_at(wav, 28),
        u16_at(wav, 32),
        u16_at(wav, 34),
        u32_at(wav, data_at - 4),
    )
}

/// (left, right) samples of a stereo WAV's data: μ-law decoded, or 16-bit PCM.
pub fn channels(wav: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let data = data(wav);
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
