//! The calibration cache in TensorRT's text layout: a header line naming
//! the algorithm (e.g. `TRT-8601-EntropyCalibration2`), then one
//! `tensor_name: <scale>` line per tensor, the scale (threshold / 127) as
//! the 8 hex digits of its IEEE-754 f32 bits. Caches written here load in
//! TensorRT tooling and the other way round.

use std::path::Path;

use crate::{CalibError, Result};

/// Scales per tensor name, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationCache {
    /// The header line.
    pub header: String,
    /// `(tensor name, scale)`; scale = threshold / 127.
    pub scales: Vec<(String, f32)>,
}

impl CalibrationCache {
    /// The scale of `name`.
    pub fn scale(&self, name: &str) -> Option<f32> {
        self.scales.iter().find(|(n, _)| n == name).map(|&(_, s)| s)
    }

    /// The cache text.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(32 * (self.scales.len() + 1));
        s.push_str(&self.header);
        s.push('\n');
        for (name, scale) in &self.scales {
            s.push_str(&format!("{name}: {:08x}\n", scale.to_bits()));
        }
        s
    }

    /// Parses cache text; every malformed line is an error naming it.
    pub fn parse(text: &str) -> Result<CalibrationCache> {
        let mut lines = text.lines().enumerate();
        let header = match lines.next() {
            Some((_, h)) if h.starts_with("TRT-") && h.contains("Calibration") => h.to_string(),
            Some((_, h)) => {
                return Err(CalibError::Cache {
                    line: 1,
                    msg: format!("header {h:?} is not a TensorRT calibration header"),
                })
            }
            None => {
                return Err(CalibError::Cache {
                    line: 1,
                    msg: "the file is empty".into(),
                })
            }
        };
        let mut scales = Vec::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let err = |msg: String| CalibError::Cache { line: i + 1, msg };
            let (name, hex) = line
                .rsplit_once(": ")
                .ok_or_else(|| err(format!("{line:?} is not `name: hexscale`")))?;
            let bits = u32::from_str_radix(hex.trim(), 16)
                .map_err(|_| err(format!("{hex:?} is not 8 hex digits")))?;
            let scale = f32::from_bits(bits);
            if !scale.is_finite() || scale < 0.0 {
                return Err(err(format!(
                    "scale {scale} of {name:?} is not a finite non-negative number"
                )));
            }
            scales.push((name.to_string(), scale));
        }
        Ok(CalibrationCache { header, scales })
    }

    /// Reads a cache file.
    pub fn load(path: &Path) -> Result<CalibrationCache> {
        let text = std::fs::read_to_string(path).map_err(|error| CalibError::Io {
            path: path.display().to_string(),
            error,
        })?;
        CalibrationCache::parse(&text)
    }

    /// Writes a cache file.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_text()).map_err(|error| CalibError::Io {
            path: path.display().to_string(),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tensorrt_layout() {
        let c = CalibrationCache {
            header: "TRT-8601-EntropyCalibration2".into(),
            scales: vec![("input".into(), 1.0 / 127.0), ("conv1:0".into(), 0.5)],
        };
        let text = c.to_text();
        assert_eq!(
            text,
            "TRT-8601-EntropyCalibration2\ninput: 3c010204\nconv1:0: 3f000000\n"
        );
        assert_eq!(CalibrationCache::parse(&text).unwrap(), c);
        assert_eq!(c.scale("conv1:0"), Some(0.5));
    }

    #[test]
    fn malformed_caches_name_the_line() {
        let e = |t: &str| CalibrationCache::parse(t).unwrap_err().to_string();
        assert!(e("").contains("empty"));
        assert!(e("hello\n").contains("line 1"));
        assert!(e("TRT-8601-EntropyCalibration2\nx: zz\n").contains("line 2"));
        assert!(e("TRT-8601-EntropyCalibration2\n\nnocolon\n").contains("line 3"));
        assert!(e("TRT-8601-EntropyCalibration2\nx: 7fc00000\n").contains("finite"));
    }

    proptest! {
        #[test]
        fn roundtrip(names in proptest::collection::vec("[a-z0-9_./:]{1,12}", 0..20),
                     scales in proptest::collection::vec(0f32..100.0, 20)) {
            let c = CalibrationCache {
                header: "TRT-8601-MinMaxCalibration".into(),
                scales: names.iter().cloned().zip(scales.iter().copied()).collect(),
            };
            prop_assert_eq!(CalibrationCache::parse(&c.to_text()).unwrap(), c);
        }
    }
}
