//! `.npy` files: numpy's array format (versions 1.0–3.0), little-endian.
//!
//! Reading accepts float32 directly and converts float64/float16 and integer
//! arrays only when the caller asks for it; everything else is a clear error.

use std::path::Path;

use crate::error::{EngineError, Result};

/// An array read from a `.npy` file, as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Shape (C order).
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// The numpy `descr` the file declared (e.g. `<f4`).
    pub descr: String,
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parses `.npy` bytes into f32. Only `<f4` is accepted unless `convert` is
/// true, in which case `<f8`, `<f2`, `|u1`, `|i1`, `<i4` and `<i8` are converted.
pub fn parse(bytes: &[u8], convert: bool, path: &str) -> Result<NpyArray> {
    let err = |msg: String| EngineError::Npy {
        path: path.to_string(),
        msg,
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err("not a .npy file (bad magic)".into()));
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err("truncated header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(err(format!("unsupported .npy version {v}"))),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| err("truncated header".into()))?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| err("header is not text".into()))?;
    let descr = dict_value(header, "descr")
        .map(|s| s.trim_matches(|c| c == '\'' || c == '"').to_string())
        .ok_or_else(|| err("header has no 'descr'".into()))?;
    let fortran = dict_value(header, "fortran_order").unwrap_or("False");
    if fortran.starts_with("True") {
        return Err(err(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let shape_txt =
        dict_value(header, "shape").ok_or_else(|| err("header has no 'shape'".into()))?;
    let shape = parse_shape(shape_txt).ok_or_else(|| err(format!("bad shape {shape_txt:?}")))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err("shape overflows".into()))?;
    let payload = &bytes[end..];
    let width = match descr.as_str() {
        "<f4" => 4,
        "<f8" | "<i8" => 8,
        "<f2" => 2,
        "|u1" | "|i1" | "|b1" => 1,
        "<i4" => 4,
        other => return Err(err(format!("unsupported dtype {other:?}"))),
    };
    if descr != "<f4" && !convert {
        return Err(err(format!(
            "dtype is {descr} ({}), expected float32 (<f4)",
            numpy_name(&descr)
        )));
    }
    let need = numel
        .checked_mul(width)
        .ok_or_else(|| err("shape overflows".into()))?;
    if payload.len() < need {
        return Err(err(format!(
            "truncated data: {} bytes for shape {:?} of {descr}, need {need}",
            payload.len(),
            shape
        )));
    }
    let p = &payload[..need];
    let data: Vec<f32> = match descr.as_str() {
        "<f4" => p
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "<f8" => p
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        "<i8" => p
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        "<i4" => p
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        "<f2" => p
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        "|i1" => p.iter().map(|&b| b as i8 as f32).collect(),
        _ => p.iter().map(|&b| b as f32).collect(),
    };
    Ok(NpyArray { shape, data, descr })
}

fn numpy_name(descr: &str) -> &'static str {
    match descr {
        "<f8" => "float64",
        "<f2" => "float16",
        "<i8" => "int64",
        "<i4" => "int32",
        "|u1" => "uint8",
        "|i1" => "int8",
        "|b1" => "bool",
        _ => "unknown",
    }
}

/// Reads a `.npy` file as f32 (see [`parse`]).
pub fn read(path: &Path, convert: bool) -> Result<NpyArray> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: p.clone(),
        error: source,
    })?;
    parse(&bytes, convert, &p)
}

/// Serialises an f32 array as `.npy` version 1.0.
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending with '\n'.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes an f32 array to a `.npy` file.
pub fn write(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    std::fs::write(path, to_bytes(shape, data)).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        error: source,
    })
}

/// The text after `'key':` up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}':");
    let pat2 = format!("\"{key}\":");
    let pos = header
        .find(&pat1)
        .map(|p| p + pat1.len())
        .or_else(|| header.find(&pat2).map(|p| p + pat2.len()))?;
    let rest = header[pos..].trim_start();
    if rest.starts_with('(') {
        let close = rest.find(')')?;
        return Some(&rest[..=close]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.trim_end_matches('L').parse::<usize>().ok())
        .collect()
}

/// A tensor name as a file name: every character outside `[A-Za-z0-9_.-]`
/// becomes `_` (the convention of the references and of `osprey run`).
pub fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// IEEE half to single, exact.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for shape in [vec![], vec![3], vec![2, 3, 4]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = to_bytes(&shape, &data);
            let back = parse(&bytes, false, "mem").unwrap();
            assert_eq!(back.shape, shape);
            assert_eq!(back.data, data);
            assert_eq!((bytes.len() - n * 4) % 64, 0);
        }
    }

    #[test]
    fn rejects_bad_files() {
        assert!(parse(b"hello", false, "x").is_err());
        let mut bytes = to_bytes(&[4], &[1.0, 2.0, 3.0, 4.0]);
        bytes.truncate(bytes.len() - 3);
        let e = parse(&bytes, false, "x").unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut hacked = to_bytes(&[1], &[1.0]);
        let at = hacked.windows(3).position(|w| w == b"<f4").unwrap();
        hacked[at + 2] = b'8';
        let e = parse(&hacked, false, "x").unwrap_err().to_string();
        assert!(e.contains("float64"), "{e}");
    }

    #[test]
    fn half_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
