//! The frame wire format: how a camera frame travels on a topic.
//!
//! Version 1: a fixed 40-byte little-endian header, then the payload.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `b"OSPF"` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | encoding: 1 rgb8, 2 bgr8, 3 rgba8, 4 bgra8, 5 gray8, 6 nv12, 7 yuyv, 16 jpeg, 17 png |
//! | 6 | 2 | header length in bytes (40; a reader skips fields a later version appends) |
//! | 8 | 4 | width in pixels |
//! | 12 | 4 | height in pixels |
//! | 16 | 4 | stride: bytes per row (luma row for NV12); 0 = tightly packed; 0 for JPEG/PNG |
//! | 20 | 4 | payload length in bytes (must equal what follows the header) |
//! | 24 | 8 | capture timestamp, nanoseconds since the UNIX epoch (0 = unknown) |
//! | 32 | 8 | sequence number (per camera, increasing) |
//!
//! Raw payloads are the pixels as [`Frame`] reads them (BT.601 limited range
//! for YUV); JPEG and PNG payloads are the compressed file. [`parse`] is the
//! fuzz-friendly entry point: it never panics, and every malformed input is
//! a typed error.

use super::frame::{Frame, FrameLimits, PixelFormat};
use super::VisionError;

/// Magic bytes that start a frame packet.
pub const MAGIC: [u8; 4] = *b"OSPF";
/// The version this build writes and reads.
pub const VERSION: u8 = 1;
/// Length of a version-1 header.
pub const HEADER_LEN: usize = 40;

/// How the payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Raw pixels.
    Raw(PixelFormat),
    /// A JPEG file.
    Jpeg,
    /// A PNG file.
    Png,
}

impl Encoding {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Encoding::Raw(f) => f.code(),
            Encoding::Jpeg => 16,
            Encoding::Png => 17,
        }
    }

    /// The encoding with wire code `c`.
    pub fn from_code(c: u8) -> Option<Encoding> {
        match c {
            16 => Some(Encoding::Jpeg),
            17 => Some(Encoding::Png),
            c => PixelFormat::from_code(c).map(Encoding::Raw),
        }
    }

    /// Lower-case name (`nv12`, `jpeg`, …).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw(f) => f.name(),
            Encoding::Jpeg => "jpeg",
            Encoding::Png => "png",
        }
    }
}

/// A packet's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload encoding.
    pub encoding: Encoding,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per row; 0 means tightly packed.
    pub stride: u32,
    /// Capture time, ns since the UNIX epoch; 0 when unknown.
    pub capture_ns: u64,
    /// Sequence number.
    pub seq: u64,
}

impl Header {
    /// The header bytes for a payload of `payload_len` bytes.
    pub fn to_bytes(&self, payload_len: usize) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.encoding.code();
        out[6..8].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.width.to_le_bytes());
        out[12..16].copy_from_slice(&self.height.to_le_bytes());
        out[16..20].copy_from_slice(&self.stride.to_le_bytes());
        let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
        out[20..24].copy_from_slice(&len.to_le_bytes());
        out[24..32].copy_from_slice(&self.capture_ns.to_le_bytes());
        out[32..40].copy_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// A raw payload as a validated [`Frame`] (JPEG/PNG are an error here:
    /// decode them first).
    pub fn frame<'a>(
        &self,
        payload: &'a [u8],
        limits: &FrameLimits,
    ) -> Result<Frame<'a>, VisionError> {
        let Encoding::Raw(format) = self.encoding else {
            return Err(VisionError::BadPacket(format!(
                "{} payload is compressed, not raw pixels",
                self.encoding.name()
            )));
        };
        let (w, h) = (self.width as usize, self.height as usize);
        limits.check(w, h)?;
        let stride = match self.stride {
            0 => format.min_stride(w).ok_or(VisionError::EmptyFrame {
                width: w,
                height: h,
            })?,
            s => s as usize,
        };
        Frame::with_limits(payload, format, w, h, stride, limits)
    }
}

/// Now as a capture timestamp: nanoseconds since the UNIX epoch (0 if the
/// clock is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Writes a whole packet (header then payload) into `out`, replacing its
/// contents; allocation-free once `out` has the capacity.
pub fn write(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&header.to_bytes(payload.len()));
    out.extend_from_slice(payload);
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Splits a packet into its header and payload, checking magic, version,
/// header length, encoding and payload length.
pub fn parse(bytes: &[u8]) -> Result<(Header, &[u8]), VisionError> {
    if bytes.len() < 8 {
        return Err(VisionError::BadPacket(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(VisionError::BadPacket(format!(
            "bad magic {:02x?} (expected \"OSPF\")",
            &bytes[..4]
        )));
    }
    if bytes[4] != VERSION {
        return Err(VisionError::BadPacket(format!(
            "version {} (this build reads version {VERSION})",
            bytes[4]
        )));
    }
    let hlen = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
    if hlen < HEADER_LEN {
        return Err(VisionError::BadPacket(format!(
            "header length {hlen} (at least {HEADER_LEN})"
        )));
    }
    let Some(payload) = bytes.get(hlen..) else {
        return Err(VisionError::BadPacket(format!(
            "{} bytes, shorter than the {hlen}-byte header",
            bytes.len()
        )));
    };
    let encoding = Encoding::from_code(bytes[5])
        .ok_or_else(|| VisionError::UnknownEncoding(format!("encoding code {}", bytes[5])))?;
    let declared = u32_at(bytes, 20) as usize;
    if declared != payload.len() {
        return Err(VisionError::BadPacket(format!(
            "payload is {} bytes, the header says {declared}",
            payload.len()
        )));
    }
    let header = Header {
        encoding,
        width: u32_at(bytes, 8),
        height: u32_at(bytes, 12),
        stride: u32_at(bytes, 16),
        capture_ns: u64_at(bytes, 24),
        seq: u64_at(bytes, 32),
    };
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(encoding: Encoding, width: u32, height: u32) -> Header {
        Header {
            encoding,
            width,
            height,
            stride: 0,
            capture_ns: 1_700_000_000_123_456_789,
            seq: 42,
        }
    }

    #[test]
    fn roundtrip_keeps_every_field() {
        let h = header(Encoding::Raw(PixelFormat::Nv12), 4, 2);
        let mut bytes = Vec::new();
        write(&h, &[16u8; 12], &mut bytes);
        assert_eq!(bytes.len(), HEADER_LEN + 12);
        let (got, payload) = parse(&bytes).unwrap();
        assert_eq!(got, h);
        let f = got.frame(payload, &FrameLimits::default()).unwrap();
        assert_eq!(
            (f.format(), f.width(), f.height(), f.stride()),
            (PixelFormat::Nv12, 4, 2, 4)
        );
        // A truncated payload disagrees with the declared length.
        assert!(matches!(
            parse(&bytes[..bytes.len() - 1]),
            Err(VisionError::BadPacket(_))
        ));
    }

    #[test]
    fn each_bad_header_is_named() {
        let h = header(Encoding::Jpeg, 8, 8);
        let mut good = Vec::new();
        write(&h, b"not really a jpeg", &mut good);
        let msg = |b: &[u8]| parse(b).unwrap_err().to_string();
        let mut v = good.clone();
        v[0] = b'X';
        assert!(msg(&v).contains("magic"), "{}", msg(&v));
        let mut v = good.clone();
        v[4] = 2;
        assert!(msg(&v).contains("version 2"), "{}", msg(&v));
        let mut v = good.clone();
        v[5] = 99;
        assert!(msg(&v).contains("encoding code 99"), "{}", msg(&v));
        let mut v = good.clone();
        v[6] = 10;
        assert!(msg(&v).contains("header length"), "{}", msg(&v));
        assert!(msg(&good[..5]).contains("shorter"));
        // Compressed payloads are not raw frames.
        let (h, p) = parse(&good).unwrap();
        assert!(h.frame(p, &FrameLimits::default()).is_err());
        // Longer headers of later versions are skipped.
        let mut longer = good[..HEADER_LEN].to_vec();
        longer[6..8].copy_from_slice(&48u16.to_le_bytes());
        longer.extend_from_slice(&[0u8; 8]);
        longer.extend_from_slice(b"not really a jpeg");
        assert_eq!(parse(&longer).unwrap().1, b"not really a jpeg");
    }

    proptest! {
        #[test]
        fn packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((h, p)) = parse(&bytes) {
                let _ = h.frame(p, &FrameLimits::default());
            }
        }

        #[test]
        fn valid_headers_with_random_sizes_give_readable_frames(
            code in 0u8..20, w in 0u32..20, h in 0u32..20, stride in 0u32..80, len in 0usize..1500
        ) {
            let Some(encoding) = Encoding::from_code(code) else { return Ok(()); };
            let hd = Header { encoding, width: w, height: h, stride, capture_ns: 0, seq: 0 };
            let mut bytes = Vec::new();
            write(&hd, &vec![7u8; len], &mut bytes);
            let (got, payload) = parse(&bytes).unwrap();
            prop_assert_eq!(got, hd);
            if let Ok(f) = got.frame(payload, &FrameLimits::default()) {
                // Every row of a parsed frame is readable.
                let w = f.width();
                let (mut r, mut g, mut b) = (vec![0u8; w], vec![0u8; w], vec![0u8; w]);
                let mut scratch = super::super::frame::RowScratch::new(w);
                for y in 0..f.height() {
                    f.row_to_planar(y, [&mut r, &mut g, &mut b], &mut scratch);
                }
            }
        }
    }
}
