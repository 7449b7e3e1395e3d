//! Loss-curve PNG from `metrics.jsonl`, drawn with a small built-in pixel font, so it needs no
//! system fonts and no C libraries (only the pure-Rust `png` encoder).

use std::path::Path;

use serde_json::Value;

use anyhow::Context;
use lmtrain_trainer::metrics::read_records;

const W: usize = 900;
const H: usize = 540;
const LEFT: usize = 90;
const RIGHT: usize = 30;
const TOP: usize = 50;
const BOTTOM: usize = 60;
const SCALE: usize = 2; // font pixels per glyph pixel

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [30, 30, 30];
const GRID: [u8; 3] = [225, 225, 225];
const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];

/// 5x7 glyphs, one byte per row, bit 4 = leftmost pixel.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'N' => [0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self { px: WHITE.iter().copied().cycle().take(W * H * 3).collect() }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line, `width` pixels thick (square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..width {
                for oy in 0..width {
                    self.set(x + ox - width / 2, y + oy - width / 2, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            let gx = x + (k * 6 * SCALE) as i64;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for sy in 0..SCALE as i64 {
                            for sx in 0..SCALE as i64 {
                                self.set(gx + (col * SCALE) as i64 + sx, y + (row * SCALE) as i64 + sy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    fn text_width(s: &str) -> i64 {
        (s.chars().count() * 6 * SCALE) as i64
    }
}

/// Draws training loss (blue) and eval loss (red) against the step from the records of
/// `metrics_path` into a PNG at `png_path`. Returns false (and writes nothing) when the log
/// holds no loss at all.
pub fn plot_losses(metrics_path: &Path, png_path: &Path) -> anyhow::Result<bool> {
    let records = read_records(metrics_path)?;
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key).and_then(Value::as_f64)?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let train = series("loss");
    let eval = series("eval_loss");
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    if all.is_empty() {
        return Ok(false);
    }
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut y_min = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut y_max = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if y_max - y_min < 1e-6 {
        y_min -= 0.5;
        y_max += 0.5;
    }
    let pad = 0.05 * (y_max - y_min);
    let (y_min, y_max) = ((y_min - pad).max(0.0), y_max + pad);

    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        let px = LEFT as f64 + x / x_max * pw;
        let py = TOP as f64 + (1.0 - (y - y_min) / (y_max - y_min)) * ph;
        (px.round() as i64, py.round() as i64)
    };
    let mut c = Canvas::new();
    let (x0, y0) = (LEFT as i64, (H - BOTTOM) as i64);
    let (x1, y1) = ((W - RIGHT) as i64, TOP as i64);
    // Grid, ticks and labels: 5 intervals on each axis.
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let yv = y_min + f * (y_max - y_min);
        let (_, py) = to_px(0.0, yv);
        c.line((x0, py), (x1, py), GRID, 1);
        let label = format!("{yv:.2}");
        c.text(x0 - 10 - Canvas::text_width(&label), py - 7, &label, BLACK);
        let xv = f * x_max;
        let (px, _) = to_px(xv, y_min);
        c.line((px, y0), (px, y1), GRID, 1);
        let label = format!("{}", xv.round() as u64);
        c.text(px - Canvas::text_width(&label) / 2, y0 + 10, &label, BLACK);
    }
    c.line((x0, y0), (x1, y0), BLACK, 2);
    c.line((x0, y0), (x0, y1), BLACK, 2);
    c.text((W as i64 - Canvas::text_width("STEP")) / 2, H as i64 - 28, "STEP", BLACK);
    c.text(x0, 14, "LOSS", BLACK);
    let mut legend_x = x1 - Canvas::text_width("TRAIN LOSS");
    for (name, color, pts) in [("TRAIN LOSS", BLUE, &train), ("EVAL LOSS", RED, &eval)] {
        if pts.is_empty() {
            continue;
        }
        for w in pts.windows(2) {
            c.line(to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1), color, 2);
        }
        for p in pts.iter() {
            let (px, py) = to_px(p.0, p.1);
            c.line((px - 2, py), (px + 2, py), color, 3);
        }
        c.text(legend_x, 14, name, color);
        legend_x -= Canvas::text_width(name) + 40;
    }
    write_png(png_path, &c.px)?;
    Ok(true)
}

fn write_png(path: &Path, rgb: &[u8]) -> anyhow::Result<()> {
    let what = || format!("writing {}", path.display());
    let file = std::fs::File::create(path).with_context(what)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().with_context(what)?;
    writer.write_image_data(rgb).with_context(what)?;
    writer.finish().with_context(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_writes_a_png_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=20 {
            text.push_str(&format!("{{\"step\":{s},\"loss\":{}}}\n", 8.0 / s as f64));
        }
        text.push_str("{\"step\":10,\"eval_loss\":1.5,\"perplexity\":4.48}\n");
        text.push_str("{\"step\":20,\"eval_loss\":0.9,\"perplexity\":2.46}\n");
        std::fs::write(&log, text).unwrap();
        let png_path = dir.path().join("loss.png");
        assert!(plot_losses(&log, &png_path).unwrap());
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let has = |c: [u8; 3]| buf.chunks_exact(3).any(|p| p == c);
        assert!(has(BLUE) && has(RED) && has(BLACK), "curves and axes drawn");
    }

    #[test]
    fn plot_of_empty_log_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("metrics.jsonl");
        std::fs::write(&log, "{\"step\":1,\"learning_rate\":0.1}\n").unwrap();
        let png_path = dir.path().join("loss.png");
        assert!(!plot_losses(&log, &png_path).unwrap());
        assert!(!png_path.exists());
    }
}
