//! Labelled boxes on a copy of the image, for people who would rather look
//! than read. Text uses a built-in 5×7 bitmap font (upper-case, digits and
//! a little punctuation), so no font files are needed on the robot.

use std::path::Path;

use super::decode::Detection;
use super::frame::RgbImage;
use super::VisionError;

/// Distinct, saturated colours; class `c` uses `PALETTE[c % len]`.
pub const PALETTE: [[u8; 3]; 10] = [
    [255, 56, 56],
    [255, 157, 151],
    [255, 112, 31],
    [255, 178, 29],
    [207, 210, 49],
    [72, 249, 10],
    [26, 147, 52],
    [0, 212, 187],
    [44, 153, 168],
    [0, 194, 255],
];

/// 5×7 glyphs: seven rows, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '\'' => [12, 4, 8, 0, 0, 0, 0],
        _ => [14, 17, 1, 2, 4, 0, 4], // '?'
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x < 0 || y < 0 || x >= img.width as i64 || y >= img.height as i64 {
        return;
    }
    let i = 3 * (y as usize * img.width + x as usize);
    if let Some(p) = img.data.get_mut(i..i + 3) {
        p.copy_from_slice(&c);
    }
}

fn fill(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
    let (x0, x1) = (x0.max(0), x1.min(img.width as i64));
    let (y0, y1) = (y0.max(0), y1.min(img.height as i64));
    for y in y0..y1 {
        for x in x0..x1 {
            put(img, x, y, c);
        }
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel a
/// `scale × scale` square.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        let gx = x + i as i64 * 6 * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (1 << (4 - col)) != 0 {
                    let px = gx + col * scale;
                    let py = y + row as i64 * scale;
                    fill(img, px, py, px + scale, py + scale, c);
                }
            }
        }
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 6 * scale
}

/// Draws every detection as a coloured rectangle with a `label score`
/// tag. Boxes partly or wholly outside the image, or with non-finite
/// coordinates, are clipped or skipped — never a panic.
pub fn draw_detections(img: &mut RgbImage, dets: &[Detection], labels: &[String]) {
    let short = img.width.min(img.height) as i64;
    let thick = (short / 250).max(2);
    let scale = ((short + 160) / 320).max(1);
    for d in dets {
        let b = d.bbox();
        if b.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let lim = 1e6f32;
        let [x1, y1, x2, y2] = b.map(|v| v.clamp(-lim, lim).round() as i64);
        let (x1, x2) = (x1.min(x2), x1.max(x2));
        let (y1, y2) = (y1.min(y2), y1.max(y2));
        let c = PALETTE[d.class_id as usize % PALETTE.len()];
        fill(img, x1, y1, x2, y1 + thick, c);
        fill(img, x1, y2 - thick, x2, y2, c);
        fill(img, x1, y1, x1 + thick, y2, c);
        fill(img, x2 - thick, y1, x2, y2, c);
        let name = labels
            .get(d.class_id as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {}", d.class_id));
        let text = format!("{name} {:.2}", d.score);
        let th = 9 * scale;
        // Above the box when there is room, else just inside its top.
        let ty = if y1 - th >= 0 { y1 - th } else { y1.max(0) };
        let tx = x1.max(0);
        fill(
            img,
            tx,
            ty,
            tx + text_width(&text, scale) + scale,
            ty + th,
            c,
        );
        let ink = if c[0] as u32 * 299 + c[1] as u32 * 587 + c[2] as u32 * 114 > 150_000 {
            [0, 0, 0]
        } else {
            [255, 255, 255]
        };
        draw_text(img, tx + scale, ty + scale, &text, scale, ink);
    }
}

/// Writes the image as PNG or JPEG (by extension).
pub fn save(img: &RgbImage, path: &Path) -> Result<(), VisionError> {
    let io = |e: String| VisionError::Io {
        path: path.display().to_string(),
        error: e,
    };
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| io("image buffer does not match its size".into()))?;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let format = match ext.as_str() {
        "png" => image::ImageFormat::Png,
        "jpg" | "jpeg" => image::ImageFormat::Jpeg,
        other => {
            return Err(io(format!(
                "cannot write '.{other}' images (use .png or .jpg)"
            )))
        }
    };
    buf.save_with_format(path, format)
        .map_err(|e| io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank(w: usize, h: usize) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            data: vec![0; 3 * w * h],
        }
    }

    fn px(img: &RgbImage, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * img.width + x);
        [img.data[i], img.data[i + 1], img.data[i + 2]]
    }

    #[test]
    fn boxes_and_tags_land_where_expected() {
        let mut img = blank(200, 100);
        let d = Detection {
            class_id: 0,
            score: 0.9,
            x1: 50.0,
            y1: 40.0,
            x2: 150.0,
            y2: 90.0,
        };
        draw_detections(&mut img, &[d], &["person".to_string()]);
        let c = PALETTE[0];
        assert_eq!(px(&img, 100, 40), c); // top edge
        assert_eq!(px(&img, 50, 60), c); // left edge
        assert_eq!(px(&img, 149, 60), c); // right edge
        assert_eq!(px(&img, 100, 65), [0, 0, 0]); // inside stays untouched
                                                  // The tag sits above the box and contains ink of another colour.
        let tag: Vec<[u8; 3]> = (31..40)
            .flat_map(|y| (50..100).map(move |x| (x, y)))
            .map(|(x, y)| px(&img, x, y))
            .collect();
        assert!(tag.contains(&c) && tag.iter().any(|p| *p != c));
    }

    #[test]
    fn hostile_boxes_do_not_panic() {
        let mut img = blank(10, 10);
        let mk = |x1: f32, y1: f32, x2: f32, y2: f32| Detection {
            class_id: 999,
            score: f32::NAN,
            x1,
            y1,
            x2,
            y2,
        };
        draw_detections(
            &mut img,
            &[
                mk(-50.0, -50.0, 500.0, 500.0),
                mk(f32::NAN, 0.0, 1.0, 1.0),
                mk(9.0, 9.0, 1.0, 1.0),
                mk(f32::MAX, f32::MIN, 0.0, 0.0),
            ],
            &[],
        );
    }

    #[test]
    fn every_glyph_fits_five_columns() {
        for c in (' '..='~').chain(['é']) {
            assert!(glyph(c).iter().all(|r| *r < 32), "{c}");
        }
        assert_ne!(glyph('a'), glyph('?'));
    }
}
