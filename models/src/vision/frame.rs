//! Camera frames: borrowed views of raw pixel buffers, and encoded images.
//!
//! A [`Frame`] is validated once, when it is made (dimensions within the
//! [`FrameLimits`], stride at least one row, buffer long enough for every
//! row), so the preprocessing code that reads it afterwards can index
//! without checks failing on outside data.
//!
//! YUV formats (NV12, YUYV) are converted with integer BT.601/BT.709
//! coefficients (16 fractional bits); chroma is taken from the 2x2 (NV12)
//! or 2x1 (YUYV) block the pixel belongs to (no chroma interpolation), as
//! most camera ISPs and V4L2 consumers do.

use osprey_kernels::color;

use super::VisionError;

/// Pixel layouts a frame can arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 3 bytes per pixel, R G B.
    Rgb8,
    /// 3 bytes per pixel, B G R (OpenCV's order).
    Bgr8,
    /// 4 bytes per pixel, R G B A (alpha ignored).
    Rgba8,
    /// 4 bytes per pixel, B G R A (alpha ignored).
    Bgra8,
    /// 1 byte per pixel, luma.
    Gray8,
    /// Planar Y (`stride` × height) followed by interleaved U V at half
    /// resolution in both axes (same `stride`).
    Nv12,
    /// Packed 4:2:2, `Y0 U Y1 V` per two pixels.
    Yuyv,
}

impl PixelFormat {
    /// Every format, for help texts and tests.
    pub const ALL: [PixelFormat; 7] = [
        PixelFormat::Rgb8,
        PixelFormat::Bgr8,
        PixelFormat::Rgba8,
        PixelFormat::Bgra8,
        PixelFormat::Gray8,
        PixelFormat::Nv12,
        PixelFormat::Yuyv,
    ];

    /// Lower-case name (`rgb8`, `nv12`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb8 => "rgb8",
            PixelFormat::Bgr8 => "bgr8",
            PixelFormat::Rgba8 => "rgba8",
            PixelFormat::Bgra8 => "bgra8",
            PixelFormat::Gray8 => "gray8",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Yuyv => "yuyv",
        }
    }

    /// Parses a name as printed by [`PixelFormat::name`] (case-insensitive).
    pub fn parse(s: &str) -> Result<PixelFormat, VisionError> {
        let l = s.to_ascii_lowercase();
        PixelFormat::ALL
            .into_iter()
            .find(|f| f.name() == l)
            .ok_or_else(|| VisionError::UnknownEncoding(s.to_string()))
    }

    /// Stable wire code (the encoding byte of a frame packet, see
    /// [`super::packet`]).
    pub fn code(self) -> u8 {
        match self {
            PixelFormat::Rgb8 => 1,
            PixelFormat::Bgr8 => 2,
            PixelFormat::Rgba8 => 3,
            PixelFormat::Bgra8 => 4,
            PixelFormat::Gray8 => 5,
            PixelFormat::Nv12 => 6,
            PixelFormat::Yuyv => 7,
        }
    }

    /// The format with wire code `c`.
    pub fn from_code(c: u8) -> Option<PixelFormat> {
        PixelFormat::ALL.into_iter().find(|f| f.code() == c)
    }

    /// Minimum bytes in one row of `width` pixels (the luma row for NV12).
    pub fn min_stride(self, width: usize) -> Option<usize> {
        match self {
            PixelFormat::Rgb8 | PixelFormat::Bgr8 => width.checked_mul(3),
            PixelFormat::Rgba8 | PixelFormat::Bgra8 => width.checked_mul(4),
            PixelFormat::Gray8 => Some(width),
            // The chroma row of an odd width still holds a whole U V pair.
            PixelFormat::Nv12 => width.checked_add(1).map(|w| w & !1),
            PixelFormat::Yuyv => width.div_ceil(2).checked_mul(4),
        }
    }

    /// Bytes a frame of this size needs (the last row need not be padded).
    pub fn required_len(self, width: usize, height: usize, stride: usize) -> Option<usize> {
        let row = self.min_stride(width)?;
        let plane = stride
            .checked_mul(height.checked_sub(1)?)?
            .checked_add(row)?;
        match self {
            PixelFormat::Nv12 => {
                let chroma_rows = height.div_ceil(2);
                stride
                    .checked_mul(height)?
                    .checked_add(stride.checked_mul(chroma_rows - 1)?)?
                    .checked_add(row)
            }
            _ => Some(plane),
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// YUV → RGB conversion matrix and range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum YuvMatrix {
    /// BT.601, limited ("video") range: Y in 16..235. What most cameras send.
    #[default]
    Bt601Limited,
    /// BT.601, full range (JPEG/JFIF).
    Bt601Full,
    /// BT.709, limited range (HD video).
    Bt709Limited,
    /// BT.709, full range.
    Bt709Full,
}

pub use osprey_kernels::color::YuvCoeffs;

impl YuvMatrix {
    /// `(kr, kb, limited range)`: what defines the matrix.
    fn params(self) -> (f64, f64, bool) {
        match self {
            YuvMatrix::Bt601Limited => (0.299, 0.114, true),
            YuvMatrix::Bt601Full => (0.299, 0.114, false),
            YuvMatrix::Bt709Limited => (0.2126, 0.0722, true),
            YuvMatrix::Bt709Full => (0.2126, 0.0722, false),
        }
    }

    /// Fixed-point coefficients for this matrix.
    pub fn coeffs(self) -> YuvCoeffs {
        let (kr, kb, limited) = self.params();
        let kg = 1.0 - kr - kb;
        let (ys, cs, y_offset) = if limited {
            (255.0 / 219.0, 255.0 / 224.0, 16)
        } else {
            (1.0, 1.0, 0)
        };
        let q = |v: f64| (v * 65536.0).round() as i32;
        YuvCoeffs {
            y_offset,
            y: q(ys),
            vr: q(2.0 * (1.0 - kr) * cs),
            ug: q(-2.0 * (1.0 - kb) * kb / kg * cs),
            vg: q(-2.0 * (1.0 - kr) * kr / kg * cs),
            ub: q(2.0 * (1.0 - kb) * cs),
        }
    }
}

/// Sizes a frame may have; anything larger is refused before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest accepted width in pixels.
    pub max_width: usize,
    /// Largest accepted height in pixels.
    pub max_height: usize,
}

impl Default for FrameLimits {
    /// 8192 × 8192: beyond any camera on a robot, small enough that a
    /// bogus header cannot make the daemon allocate gigabytes.
    fn default() -> Self {
        FrameLimits {
            max_width: 8192,
            max_height: 8192,
        }
    }
}

impl FrameLimits {
    /// Checks `width × height` against the limits (and against zero).
    pub fn check(&self, width: usize, height: usize) -> Result<(), VisionError> {
        if width == 0 || height == 0 {
            return Err(VisionError::EmptyFrame { width, height });
        }
        if width > self.max_width || height > self.max_height {
            return Err(VisionError::TooLarge {
                width,
                height,
                max_width: self.max_width,
                max_height: self.max_height,
            });
        }
        Ok(())
    }
}

/// A validated, borrowed raw frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    data: &'a [u8],
    format: PixelFormat,
    width: usize,
    height: usize,
    stride: usize,
    yuv: YuvMatrix,
}

impl<'a> Frame<'a> {
    /// A frame with the default limits; `stride` is bytes per row (per luma
    /// row for NV12).
    pub fn new(
        data: &'a [u8],
        format: PixelFormat,
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Frame<'a>, VisionError> {
        Frame::with_limits(data, format, width, height, stride, &FrameLimits::default())
    }

    /// A tightly packed frame (stride = the format's minimum).
    pub fn packed(
        data: &'a [u8],
        format: PixelFormat,
        width: usize,
        height: usize,
    ) -> Result<Frame<'a>, VisionError> {
        let stride = format.min_stride(width).unwrap_or(usize::MAX);
        Frame::new(data, format, width, height, stride)
    }

    /// A frame checked against `limits`.
    pub fn with_limits(
        data: &'a [u8],
        format: PixelFormat,
        width: usize,
        height: usize,
        stride: usize,
        limits: &FrameLimits,
    ) -> Result<Frame<'a>, VisionError> {
        limits.check(width, height)?;
        let min = format
            .min_stride(width)
            .ok_or(VisionError::EmptyFrame { width, height })?;
        if stride < min {
            return Err(VisionError::StrideTooSmall {
                format,
                width,
                stride,
                min,
            });
        }
        let need = format
            .required_len(width, height, stride)
            .ok_or(VisionError::EmptyFrame { width, height })?;
        if data.len() < need {
            return Err(VisionError::BufferTooShort {
                format,
                width,
                height,
                stride,
                need,
                got: data.len(),
            });
        }
        Ok(Frame {
            data,
            format,
            width,
            height,
            stride,
            yuv: YuvMatrix::default(),
        })
    }

    /// Sets the YUV matrix (ignored for RGB and gray formats).
    pub fn with_yuv(mut self, m: YuvMatrix) -> Frame<'a> {
        self.yuv = m;
        self
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }
    /// Pixel format.
    pub fn format(&self) -> PixelFormat {
        self.format
    }
    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// YUV matrix used for NV12/YUYV.
    pub fn yuv(&self) -> YuvMatrix {
        self.yuv
    }

    /// Row `y` of an RGB8 frame, borrowed (no conversion needed), else `None`.
    pub fn rgb_row(&self, y: usize) -> Option<&'a [u8]> {
        if self.format != PixelFormat::Rgb8 || y >= self.height {
            return None;
        }
        let s = y * self.stride;
        self.data.get(s..s + 3 * self.width)
    }

    /// Converts row `y` to planar R, G, B (each at least `width` bytes),
    /// using `scratch` (made for at least this width) for YUV formats. Rows
    /// past the end are clamped to the last row.
    pub fn row_to_planar(&self, y: usize, planes: [&mut [u8]; 3], scratch: &mut RowScratch) {
        let y = y.min(self.height - 1);
        let w = self.width;
        let [r, g, b] = planes;
        let (r, g, b) = (&mut r[..w], &mut g[..w], &mut b[..w]);
        let row = &self.data[y * self.stride..];
        let deinterleave =
            |bpp: usize, ro: usize, bo: usize, r: &mut [u8], g: &mut [u8], b: &mut [u8]| {
                for (((p, r), g), b) in row
                    .chunks_exact(bpp)
                    .zip(r.iter_mut())
                    .zip(g.iter_mut())
                    .zip(b.iter_mut())
                {
                    *r = p[ro];
                    *g = p[1];
                    *b = p[bo];
                }
            };
        match self.format {
            PixelFormat::Rgb8 => deinterleave(3, 0, 2, r, g, b),
            PixelFormat::Bgr8 => deinterleave(3, 2, 0, r, g, b),
            PixelFormat::Rgba8 => deinterleave(4, 0, 2, r, g, b),
            PixelFormat::Bgra8 => deinterleave(4, 2, 0, r, g, b),
            PixelFormat::Gray8 => {
                r.copy_from_slice(&row[..w]);
                g.copy_from_slice(&row[..w]);
                b.copy_from_slice(&row[..w]);
            }
            PixelFormat::Nv12 => {
                let uv_start = self.stride * self.height + (y / 2) * self.stride;
                let uv = &self.data[uv_start..uv_start + w.div_ceil(2) * 2];
                let (cu, cv) = (&mut scratch.u[..w], &mut scratch.v[..w]);
                color::expand_nv12_chroma(uv, cu, cv);
                color::yuv_to_rgb_planar(&self.yuv.coeffs(), &row[..w], cu, cv, r, g, b);
            }
            PixelFormat::Yuyv => {
                let packed = &row[..w.div_ceil(2) * 4];
                let (l, cu, cv) = (
                    &mut scratch.y[..w],
                    &mut scratch.u[..w],
                    &mut scratch.v[..w],
                );
                for (((q, l2), u2), v2) in packed
                    .chunks_exact(4)
                    .zip(l.chunks_mut(2))
                    .zip(cu.chunks_mut(2))
                    .zip(cv.chunks_mut(2))
                {
                    for (i, ((l, u), v)) in l2
                        .iter_mut()
                        .zip(u2.iter_mut())
                        .zip(v2.iter_mut())
                        .enumerate()
                    {
                        *l = q[2 * i];
                        *u = q[1];
                        *v = q[3];
                    }
                }
                color::yuv_to_rgb_planar(&self.yuv.coeffs(), l, cu, cv, r, g, b);
            }
        }
    }

    /// The RGB value of one pixel, computed the plain way (reference for
    /// tests; [`Frame::row_to_planar`] is the fast path).
    pub fn pixel_rgb(&self, x: usize, y: usize) -> [u8; 3] {
        let d = self.data;
        let s = self.stride;
        match self.format {
            PixelFormat::Rgb8 => [d[y * s + 3 * x], d[y * s + 3 * x + 1], d[y * s + 3 * x + 2]],
            PixelFormat::Bgr8 => [d[y * s + 3 * x + 2], d[y * s + 3 * x + 1], d[y * s + 3 * x]],
            PixelFormat::Rgba8 => [d[y * s + 4 * x], d[y * s + 4 * x + 1], d[y * s + 4 * x + 2]],
            PixelFormat::Bgra8 => [d[y * s + 4 * x + 2], d[y * s + 4 * x + 1], d[y * s + 4 * x]],
            PixelFormat::Gray8 => [d[y * s + x]; 3],
            PixelFormat::Nv12 => {
                let uv = s * self.height + (y / 2) * s + (x / 2) * 2;
                self.yuv.coeffs().rgb(d[y * s + x], d[uv], d[uv + 1])
            }
            PixelFormat::Yuyv => {
                let q = y * s + (x / 2) * 4;
                let yv = d[q + 2 * (x % 2)];
                self.yuv.coeffs().rgb(yv, d[q + 1], d[q + 3])
            }
        }
    }
}

/// Scratch rows for [`Frame::row_to_planar`] (luma and per-pixel chroma of
/// packed YUV formats).
#[derive(Debug, Clone, Default)]
pub struct RowScratch {
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl RowScratch {
    /// Scratch for rows of `width` pixels.
    pub fn new(width: usize) -> RowScratch {
        RowScratch {
            y: vec![0; width],
            u: vec![0; width],
            v: vec![0; width],
        }
    }
}

/// An owned decoded image (RGB8), e.g. from a JPEG or PNG file.
#[derive(Debug, Clone)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Packed RGB8 pixels, `3 × width × height` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A borrowed frame view of this image.
    pub fn frame(&self) -> Frame<'_> {
        Frame {
            data: &self.data,
            format: PixelFormat::Rgb8,
            width: self.width,
            height: self.height,
            stride: 3 * self.width,
            yuv: YuvMatrix::default(),
        }
    }
}

/// Decodes an encoded image (JPEG or PNG, detected from its bytes) to RGB8,
/// dropping alpha, applying no EXIF rotation or colour management (as the
/// reference pipeline does). Dimensions are checked against `limits`
/// before pixels are decoded.
pub fn decode_image(bytes: &[u8], limits: &FrameLimits) -> Result<RgbImage, VisionError> {
    use image::ImageFormat;
    let format = image::guess_format(bytes).map_err(|_| {
        VisionError::UnknownEncoding(format!(
            "not a JPEG or PNG (starts with {:02x?})",
            &bytes[..bytes.len().min(4)]
        ))
    })?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png) {
        return Err(VisionError::UnknownEncoding(format!(
            "{format:?} images are not supported (JPEG and PNG are)"
        )));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width.min(u32::MAX as usize) as u32);
    l.max_image_height = Some(limits.max_height.min(u32::MAX as usize) as u32);
    reader.limits(l);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => VisionError::TooLarge {
            width: 0,
            height: 0,
            max_width: limits.max_width,
            max_height: limits.max_height,
        },
        other => VisionError::Decode(other.to_string()),
    })?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    limits.check(w, h)?;
    Ok(RgbImage {
        width: w,
        height: h,
        data: rgb.into_raw(),
    })
}

/// Reads and decodes an image file (see [`decode_image`]).
pub fn read_image(path: &std::path::Path, limits: &FrameLimits) -> Result<RgbImage, VisionError> {
    let bytes = std::fs::read(path).map_err(|e| VisionError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    decode_image(&bytes, limits)
}

/// Encodes an RGB image into a tightly packed raw `format` (what a camera
/// would deliver): the inverse of the conversions [`Frame`] reads, with
/// chroma averaged over each 2×2 (NV12) or 2×1 (YUYV) block. For tests,
/// benchmarks and `osprey detect --frame-format`.
pub fn encode_rgb(img: &RgbImage, format: PixelFormat, m: YuvMatrix) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let px = |x: usize, y: usize| {
        let i = 3 * (y * w + x);
        [img.data[i], img.data[i + 1], img.data[i + 2]]
    };
    let (kr, kb, limited) = m.params();
    let kg = 1.0 - kr - kb;
    let (ys, yo, cs) = if limited {
        (219.0, 16.0, 224.0)
    } else {
        (255.0, 0.0, 255.0)
    };
    let q = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let luma = |p: [u8; 3]| {
        let (r, g, b) = (
            p[0] as f64 / 255.0,
            p[1] as f64 / 255.0,
            p[2] as f64 / 255.0,
        );
        kr * r + kg * g + kb * b
    };
    let y_of = |p: [u8; 3]| q(yo + ys * luma(p));
    // Chroma of the mean colour of a block of pixels.
    let uv_of = |ps: &[[u8; 3]]| {
        let n = ps.len() as f64;
        let mean: [u8; 3] =
            std::array::from_fn(|c| q(ps.iter().map(|p| p[c] as f64).sum::<f64>() / n));
        let l = luma(mean);
        let u = (mean[2] as f64 / 255.0 - l) / (2.0 * (1.0 - kb));
        let v = (mean[0] as f64 / 255.0 - l) / (2.0 * (1.0 - kr));
        (q(128.0 + cs * u), q(128.0 + cs * v))
    };
    let mut out = Vec::new();
    match format {
        PixelFormat::Rgb8 => out.extend_from_slice(&img.data),
        PixelFormat::Bgr8 => out.extend(img.data.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]])),
        PixelFormat::Rgba8 => out.extend(
            img.data
                .chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255]),
        ),
        PixelFormat::Bgra8 => out.extend(
            img.data
                .chunks_exact(3)
                .flat_map(|p| [p[2], p[1], p[0], 255]),
        ),
        PixelFormat::Gray8 => out.extend(
            img.data
                .chunks_exact(3)
                .map(|p| q(255.0 * luma([p[0], p[1], p[2]]))),
        ),
        PixelFormat::Nv12 => {
            let cw = w.div_ceil(2);
            for y in 0..h {
                // Rows are `min_stride` bytes: an odd width pads one byte.
                out.extend((0..2 * cw).map(|x| y_of(px(x.min(w - 1), y))));
            }
            for cy in 0..h.div_ceil(2) {
                for cx in 0..cw {
                    let mut block = [[0u8; 3]; 4];
                    let mut n = 0;
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let (x, y) = (2 * cx + dx, 2 * cy + dy);
                        if x < w && y < h {
                            block[n] = px(x, y);
                            n += 1;
                        }
                    }
                    let (u, v) = uv_of(&block[..n]);
                    out.extend([u, v]);
                }
            }
        }
        PixelFormat::Yuyv => {
            for y in 0..h {
                for cx in 0..w.div_ceil(2) {
                    let a = px(2 * cx, y);
                    let b = if 2 * cx + 1 < w { px(2 * cx + 1, y) } else { a };
                    let (u, v) = uv_of(&[a, b]);
                    out.extend([y_of(a), u, y_of(b), v]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bt601_limited_reference_points() {
        let k = YuvMatrix::Bt601Limited.coeffs();
        assert_eq!(k.rgb(16, 128, 128), [0, 0, 0]);
        assert_eq!(k.rgb(235, 128, 128), [255, 255, 255]);
        // 75% red bar of the SMPTE pattern in BT.601: Y=81 U=90 V=240.
        let [r, g, b] = k.rgb(81, 90, 240);
        assert!(r >= 250 && g <= 3 && b <= 3, "{r} {g} {b}");
        let f = YuvMatrix::Bt601Full.coeffs();
        assert_eq!(f.rgb(128, 128, 128), [128, 128, 128]);
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let buf = vec![0u8; 100];
        assert!(matches!(
            Frame::new(&buf, PixelFormat::Rgb8, 0, 4, 12),
            Err(VisionError::EmptyFrame { .. })
        ));
        assert!(matches!(
            Frame::new(&buf, PixelFormat::Rgb8, 4, 4, 11),
            Err(VisionError::StrideTooSmall { .. })
        ));
        assert!(matches!(
            Frame::new(&buf, PixelFormat::Rgb8, 8, 8, 24),
            Err(VisionError::BufferTooShort { .. })
        ));
        assert!(matches!(
            Frame::new(&buf, PixelFormat::Gray8, 9000, 1, 9000),
            Err(VisionError::TooLarge { .. })
        ));
        let small = FrameLimits {
            max_width: 4,
            max_height: 4,
        };
        assert!(Frame::with_limits(&buf, PixelFormat::Gray8, 5, 1, 5, &small).is_err());
        // NV12 needs the chroma plane too: 4x4 luma (16) + 2 chroma rows (8).
        assert!(Frame::new(&buf[..23], PixelFormat::Nv12, 4, 4, 4).is_err());
        assert!(Frame::new(&buf[..24], PixelFormat::Nv12, 4, 4, 4).is_ok());
        assert!(matches!(
            PixelFormat::parse("h264"),
            Err(VisionError::UnknownEncoding(_))
        ));
    }

    #[test]
    fn truncated_and_unknown_images_are_errors() {
        let mut png = Vec::new();
        let img = image::RgbImage::from_pixel(8, 6, image::Rgb([10, 20, 30]));
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let ok = decode_image(&png, &FrameLimits::default()).unwrap();
        assert_eq!((ok.width, ok.height), (8, 6));
        assert_eq!(&ok.data[..3], &[10, 20, 30]);
        assert!(matches!(
            decode_image(&png[..png.len() / 2], &FrameLimits::default()),
            Err(VisionError::Decode(_))
        ));
        assert!(matches!(
            decode_image(b"GIF89a....", &FrameLimits::default()),
            Err(VisionError::UnknownEncoding(_))
        ));
        assert!(matches!(
            decode_image(b"", &FrameLimits::default()),
            Err(VisionError::UnknownEncoding(_))
        ));
        let tiny = FrameLimits {
            max_width: 4,
            max_height: 4,
        };
        assert!(matches!(
            decode_image(&png, &tiny),
            Err(VisionError::TooLarge { .. })
        ));
        let mut jpg = Vec::new();
        let big = image::RgbImage::from_pixel(64, 48, image::Rgb([200, 100, 50]));
        big.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        assert!(decode_image(&jpg, &FrameLimits::default()).is_ok());
        assert!(decode_image(&jpg[..jpg.len() / 3], &FrameLimits::default()).is_err());
    }

    fn any_frame() -> impl Strategy<Value = (PixelFormat, usize, usize, usize, Vec<u8>)> {
        (0usize..7, 1usize..9, 1usize..7, 0usize..5).prop_flat_map(|(f, w, h, pad)| {
            let format = PixelFormat::ALL[f];
            let stride = format.min_stride(w).unwrap() + pad;
            let len = format.required_len(w, h, stride).unwrap();
            (
                Just(format),
                Just(w),
                Just(h),
                Just(stride),
                proptest::collection::vec(any::<u8>(), len),
            )
        })
    }

    proptest! {
        #[test]
        fn planar_rows_match_per_pixel_reference((format, w, h, stride, data) in any_frame()) {
            for m in [YuvMatrix::Bt601Limited, YuvMatrix::Bt709Limited, YuvMatrix::Bt709Full] {
                let f = Frame::new(&data, format, w, h, stride).unwrap().with_yuv(m);
                let (mut r, mut g, mut b) = (vec![0u8; w], vec![0u8; w], vec![0u8; w]);
                let mut scratch = RowScratch::new(w);
                for y in 0..h {
                    f.row_to_planar(y, [&mut r, &mut g, &mut b], &mut scratch);
                    for x in 0..w {
                        prop_assert_eq!([r[x], g[x], b[x]], f.pixel_rgb(x, y), "x {} y {}", x, y);
                    }
                }
            }
        }
    }

    #[test]
    fn encoded_frames_decode_back_close_to_the_image() {
        // A smooth gradient: chroma subsampling loses little.
        let (w, h) = (37, 21);
        let data: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 6) as u8, (y * 11) as u8, (128 + x - y) as u8]
            })
            .collect();
        let img = RgbImage {
            width: w,
            height: h,
            data,
        };
        for format in PixelFormat::ALL {
            for m in [YuvMatrix::Bt601Limited, YuvMatrix::Bt709Full] {
                let raw = encode_rgb(&img, format, m);
                let f = Frame::packed(&raw, format, w, h).unwrap().with_yuv(m);
                let mut worst = 0i32;
                for y in 0..h {
                    for x in 0..w {
                        let got = f.pixel_rgb(x, y);
                        let want = &img.data[3 * (y * w + x)..3 * (y * w + x) + 3];
                        if format == PixelFormat::Gray8 {
                            continue;
                        }
                        for c in 0..3 {
                            worst = worst.max((got[c] as i32 - want[c] as i32).abs());
                        }
                    }
                }
                let tol = if matches!(format, PixelFormat::Nv12 | PixelFormat::Yuyv) {
                    12
                } else {
                    0
                };
                assert!(worst <= tol, "{format} {m:?}: off by {worst}");
            }
        }
    }
}
