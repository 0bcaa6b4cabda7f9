//! Bytes in, the model's 28x28 input out: the one preprocessing path shared by the server, the CLI, the tests
//! and the benches.
//!
//! Encoded images: decode (with explicit limits) → grayscale (alpha composited over white) → the upload
//! conversion ([`UploadConversion`]): the way Fashion-MNIST itself was made from product photos (background
//! estimated from the border, trimmed, the longest edge scaled to 28, centred, the background mapped to 0 and
//! the garment negated when the photo is light). A 28x28 file is the dataset's own format: it only gets the
//! polarity step. Raw 784-byte images are taken as they are. Every path then goes through the same input check,
//! and [`ModelInput::write_scaled`] is the only place that knows the model wants `pixel / 255`.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageError, ImageFormat, ImageReader, imageops::FilterType};

pub use crate::core::reason::Reason;

/// Side of the model's square input.
pub const SIDE: usize = 28;
/// Pixels per model input.
pub const PIXELS: usize = SIDE * SIDE;

/// One image as a client sent it.
#[derive(Debug, Clone, Copy)]
pub enum ImageData<'a> {
    /// An encoded file in one of [`ACCEPTED_FORMATS`].
    Encoded(&'a [u8]),
    /// 28x28 8-bit grayscale, row-major, 0 = background.
    Raw(&'a [u8]),
    /// 28x28 values the model takes as they are: `pixel / 255`, in [0, 1], row-major, 0 = background.
    Scaled(&'a [f32]),
}

/// An image that cannot be classified, with the reason and a sentence for a human.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// The 28x28 pixels, when the image got that far (lets a client show what was judged).
    pub pixels: Option<Box<[u8; PIXELS]>>,
}

impl Rejection {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
            pixels: None,
        }
    }
}

/// The model's input for one image: 28x28 grayscale, 0 = background.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    /// The pixels the input check judged (and a client may see).
    pub pixels: Box<[u8; PIXELS]>,
    /// The caller's own model-ready values ([`ImageData::Scaled`]), which the model runs on unrounded.
    pub scaled: Option<Box<[f32; PIXELS]>>,
}

impl ModelInput {
    pub fn from_pixels(pixels: Box<[u8; PIXELS]>) -> Self {
        ModelInput { pixels, scaled: None }
    }

    /// Writes the tensor values the model expects (`pixel / 255`, see models/*.json `input.scaling`).
    pub fn write_scaled(&self, out: &mut [f32]) {
        match &self.scaled {
            Some(values) => out[..PIXELS].copy_from_slice(&values[..]),
            None => {
                for (o, &p) in out.iter_mut().zip(self.pixels.iter()) {
                    // A division, as training and export compute it: `x * (1/255)` differs in the last bit.
                    *o = f32::from(p) / 255.0;
                }
            }
        }
    }
}

/// The encoded formats the service decodes (docs/api.md "Preprocessing"); any other is UNDECODABLE unread.
pub const ACCEPTED_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::WebP,
    ImageFormat::Tiff,
];
/// [`ACCEPTED_FORMATS`] as a client reads them in an error message.
pub const ACCEPTED_FORMAT_NAMES: &str = "PNG, JPEG, GIF, BMP, WebP or TIFF";

/// Limits applied while decoding, so a small file declaring a huge image cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted width or height, in pixels.
    pub max_dimension: u32,
    /// Largest buffer the decoder may allocate, in bytes.
    pub max_alloc_bytes: u64,
}

impl DecodeLimits {
    fn to_image_limits(self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.max_dimension);
        limits.max_image_height = Some(self.max_dimension);
        limits.max_alloc = Some(self.max_alloc_bytes);
        limits
    }

    /// The most memory decoding one image can hold at once: the decoder's buffer (bounded by
    /// `max_alloc_bytes`), its 2-byte luma+alpha copy (half of it for 8-bit RGBA) and the gray image (a
    /// quarter), plus the decoder's own state. Measured: a 4096x4000 RGBA PNG (62.5 MiB decoded) raised the
    /// server's peak RSS by 127 MiB. The memory budget (docs/reliability.md "Memory budget") multiplies it by
    /// the slots.
    pub fn peak_bytes_per_image(self) -> u64 {
        2 * self.max_alloc_bytes + (4 << 20)
    }
}

/// Thresholds of the input check (how the defaults were chosen: docs/models.md "Input checks and their
/// calibration").
#[derive(Debug, Clone, Copy)]
pub struct InputCheck {
    /// Pixels at or below this level (0..255) count as near black.
    pub dark_level: u8,
    /// Pixels at or above this level count as near white.
    pub bright_level: u8,
    /// Reject when more than this fraction of pixels is near black.
    pub max_dark_fraction: f32,
    /// Reject when more than this fraction of pixels is near white.
    pub max_bright_fraction: f32,
    /// Reject when the pixel standard deviation (0..255 scale) is below this.
    pub min_contrast: f32,
}

/// How an uploaded photo becomes the model's input (docs/api.md "Preprocessing"). Fashion-MNIST's images were
/// made from Zalando's product photos by trimming the edges within 5% of the corner pixels' colour, resizing
/// the longest edge to 28, sharpening (Gaussian, sigma 1.0), centring on a 28x28 canvas and negating (Xiao,
/// Rasul and Vollgraf 2017, the dataset's README). This does the same, with the background estimated from the
/// whole border so that uneven light and noise do not move it. The defaults were chosen on product photos made
/// from the validation split (training/product_photos.py, docs/preprocessing.md).
#[derive(Debug, Clone, Copy)]
pub struct UploadConversion {
    /// How far a pixel may stand out from the background and still count as background, on the scale where
    /// the background is 0 and black on white is 255: rows and columns with nothing beyond it are trimmed, and
    /// everything within it becomes exactly 0.
    pub background_tolerance: u8,
    /// Sigma of the unsharp mask applied once the garment is 28 pixels long; 0 turns it off.
    pub sharpen_sigma: f32,
}

/// Everything [`preprocess`] is configured by.
#[derive(Debug, Clone, Copy)]
pub struct PreprocessSettings {
    pub limits: DecodeLimits,
    pub conversion: UploadConversion,
    pub check: InputCheck,
}

/// Turns one client image into the model's input, or says why it cannot be classified.
pub fn preprocess(image: ImageData<'_>, settings: &PreprocessSettings) -> Result<ModelInput, Rejection> {
    let mut scaled = None;
    let (pixels, inverted) = match image {
        ImageData::Raw(bytes) => {
            let pixels: [u8; PIXELS] = bytes.try_into().map_err(|_| {
                Rejection::new(
                    Reason::WrongSize,
                    format!(
                        "raw image has {} bytes; expected {PIXELS} (28x28 8-bit grayscale)",
                        bytes.len()
                    ),
                )
            })?;
            (Box::new(pixels), false)
        }
        ImageData::Scaled(values) => {
            let values = checked_scaled(values)?;
            // The check judges the pixels the values stand for; the model still runs on the values themselves.
            let pixels = values.map(|v| (v * 255.0).round() as u8);
            scaled = Some(values);
            (Box::new(pixels), false)
        }
        ImageData::Encoded(bytes) => {
            let gray = decode_grayscale(bytes, &settings.limits)?;
            settings.conversion.convert(&gray)?
        }
    };
    match settings.check.check(&pixels, inverted) {
        Ok(()) => Ok(ModelInput { pixels, scaled }),
        Err(mut rejection) => {
            rejection.pixels = Some(pixels);
            Err(rejection)
        }
    }
}

/// Model-ready values, if there are 784 of them and each is a number in [0, 1].
fn checked_scaled(values: &[f32]) -> Result<Box<[f32; PIXELS]>, Rejection> {
    let values: &[f32; PIXELS] = values.try_into().map_err(|_| {
        Rejection::new(
            Reason::WrongSize,
            format!("image has {} values; expected {PIXELS} (28x28)", values.len()),
        )
    })?;
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
        return Err(Rejection::new(
            Reason::Undecodable,
            format!("value {v} at index {i} is outside [0, 1]: send pixel / 255, with 0 as the background"),
        ));
    }
    Ok(Box::new(*values))
}

fn decode_grayscale(bytes: &[u8], limits: &DecodeLimits) -> Result<GrayImage, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new(Reason::Undecodable, "image is empty (0 bytes)"));
    }
    let stripped = png_pixel_chunks(bytes);
    let bytes = stripped.as_deref().unwrap_or(bytes);
    let mut reader = reader(bytes)?;
    reader.limits(limits.to_image_limits());
    let decoded = reader.decode().map_err(|e| match e {
        ImageError::Limits(l) => Rejection::new(
            Reason::TooLarge,
            format!(
                "image exceeds the decode limits ({} px per side, {} MiB): {l}",
                limits.max_dimension,
                limits.max_alloc_bytes >> 20
            ),
        ),
        other => Rejection::new(Reason::Undecodable, format!("cannot decode image: {other}")),
    })?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(Rejection::new(Reason::Undecodable, "image has no pixels"));
    }
    Ok(to_grayscale(decoded))
}

/// A reader for `bytes` once its format is known to be one of [`ACCEPTED_FORMATS`]. The check is ours, not
/// only the build's: a codec that a dependency switches on later still never sees a client's bytes.
fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, Rejection> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Rejection::new(Reason::Undecodable, format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(format) if ACCEPTED_FORMATS.contains(&format) => Ok(reader),
        Some(format) => Err(Rejection::new(
            Reason::Undecodable,
            format!("{format:?} images are not accepted: send {ACCEPTED_FORMAT_NAMES}, or 784 raw bytes"),
        )),
        None => Err(Rejection::new(
            Reason::Undecodable,
            format!("unrecognised image format: send {ACCEPTED_FORMAT_NAMES}, or 784 raw bytes"),
        )),
    }
}

/// The pixels (width x height) an encoded image declares in its header, read without decoding it; `None`
/// when the header cannot be read or the format is not accepted (decoding will then say why). The pipeline
/// uses it to tell cheap images from costly ones before a decode slot is chosen.
pub fn declared_pixels(bytes: &[u8], limits: &DecodeLimits) -> Option<u64> {
    // A PNG's size is in its first chunk: read it there, as the decoder would inflate the chunks before IDAT
    // (a 48 MiB iCCP profile took 40 ms, on an async worker).
    if let Some((w, h)) = png_dimensions(bytes) {
        return (w <= limits.max_dimension && h <= limits.max_dimension).then(|| u64::from(w) * u64::from(h));
    }
    let mut reader = reader(bytes).ok()?;
    reader.limits(limits.to_image_limits());
    let (w, h) = reader.into_dimensions().ok()?;
    Some(u64::from(w) * u64::from(h))
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// A PNG's width and height from its IHDR chunk, which the format puts first.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let rest = bytes.strip_prefix(PNG_SIGNATURE)?;
    let ihdr = rest.get(..16)?;
    if &ihdr[4..8] != b"IHDR" {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes([ihdr[i], ihdr[i + 1], ihdr[i + 2], ihdr[i + 3]]);
    Some((word(8), word(12)))
}

/// The chunks of a PNG that make its pixels (critical chunks, and tRNS for transparency), without the
/// ancillary ones: colour profiles, text and animation chunks are compressed blobs the decoder would inflate
/// (a 49 KB file's iCCP inflated to 48 MiB) for nothing a 28x28 grayscale classifier uses. `None` when `bytes`
/// is not a PNG; a malformed one is left whole, for the decoder to refuse.
fn png_pixel_chunks(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut rest = bytes.strip_prefix(PNG_SIGNATURE)?;
    let mut kept = Vec::with_capacity(bytes.len());
    kept.extend_from_slice(PNG_SIGNATURE);
    while rest.len() >= 12 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let total = len.checked_add(12).filter(|&t| t <= rest.len())?;
        let kind = &rest[4..8];
        // Critical chunks start with an upper-case letter (IHDR, PLTE, IDAT, IEND).
        if kind[0].is_ascii_uppercase() || kind == b"tRNS" {
            kept.extend_from_slice(&rest[..total]);
        }
        rest = &rest[total..];
        if kind == b"IEND" {
            break;
        }
    }
    Some(kept)
}

/// Grayscale with any transparency composited over white: a cut-out garment on a transparent background then
/// looks like a product photo on white, which the polarity step turns into the dataset's convention.
fn to_grayscale(image: DynamicImage) -> GrayImage {
    if !image.color().has_alpha() {
        return image.into_luma8();
    }
    let la = image.into_luma_alpha8();
    GrayImage::from_fn(la.width(), la.height(), |x, y| {
        let [l, a] = la.get_pixel(x, y).0;
        let (l, a) = (u32::from(l), u32::from(a));
        image::Luma([((l * a + 255 * (255 - a) + 127) / 255) as u8])
    })
}

/// Fashion-MNIST garments are light on a dark background; photos usually are the opposite. The border says
/// which: its mean above mid-grey means a light background.
fn has_light_border(gray: &GrayImage) -> bool {
    let (w, h) = gray.dimensions();
    let (mut sum, mut n) = (0u64, 0u64);
    for (x, y, p) in gray.enumerate_pixels() {
        if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
            sum += u64::from(p.0[0]);
            n += 1;
        }
    }
    sum > 128 * n
}

/// What is left of a photo once its background is trimmed, in the photo's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Content {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

/// The longest side of the cells the content is searched on: each cell is at most a quarter of an output pixel,
/// and averaging a photo's pixels into cells takes its noise down before the tolerance judges them.
const SEARCH_SIDE: u32 = 4 * SIDE as u32;
/// Content shorter than this many pixels, or than [`MIN_CONTENT_SHARE`] of the photo's longer side, is a dot.
const MIN_CONTENT_PIXELS: u32 = 8;
const MIN_CONTENT_SHARE: f64 = 0.03;
/// Content whose shorter side would be under this many of the 28 pixels is a line. Fashion-MNIST's narrowest
/// garments (sandal soles, trousers seen from the side) keep 4 or more (training set, docs/preprocessing.md).
const MIN_FITTED_SIDE: f64 = 2.0;

impl UploadConversion {
    /// The 28x28 input for a decoded image, and whether it was negated (it was light on dark as sent).
    fn convert(&self, gray: &GrayImage) -> Result<(Box<[u8; PIXELS]>, bool), Rejection> {
        let (w, h) = gray.dimensions();
        if (w, h) == (SIDE as u32, SIDE as u32) {
            // The dataset's own format, trimmed and centred already: only the polarity step, so a dataset image
            // sent as a file gives exactly the input it gives sent raw.
            let light = has_light_border(gray);
            let mut out = Box::new([0u8; PIXELS]);
            for (o, &p) in out.iter_mut().zip(gray.as_raw()) {
                *o = if light { 255 - p } else { p };
            }
            return Ok((out, light));
        }
        let background = Background::of(gray);
        let ink = background.ink(gray);
        let Some(content) = content_box(&ink, self.background_tolerance) else {
            // Nothing stands out from the background: the input check reports a blank image.
            return Ok((Box::new([0u8; PIXELS]), background.light));
        };
        let (long, short) = (content.w.max(content.h), content.w.min(content.h));
        if long < MIN_CONTENT_PIXELS || f64::from(long) < MIN_CONTENT_SHARE * f64::from(w.max(h)) {
            return Err(Rejection::new(
                Reason::TinyObject,
                format!(
                    "once the background is trimmed, {}x{} pixels of the {w}x{h} image are left: a dot, too small to classify",
                    content.w, content.h
                ),
            ));
        }
        let scale = SIDE as f64 / f64::from(long);
        if f64::from(short) * scale < MIN_FITTED_SIDE {
            return Err(Rejection::new(
                Reason::TinyObject,
                format!(
                    "once the background is trimmed, {}x{} pixels of the {w}x{h} image are left: a line, too thin to classify",
                    content.w, content.h
                ),
            ));
        }
        let crop = image::imageops::crop_imm(&ink, content.x, content.y, content.w, content.h).to_image();
        let fit = |side: u32| ((f64::from(side) * scale).round() as u32).clamp(1, SIDE as u32);
        let mut garment = image::imageops::resize(&crop, fit(content.w), fit(content.h), FilterType::Triangle);
        self.background_to_zero(&mut garment);
        if self.sharpen_sigma > 0.0 {
            garment = image::imageops::unsharpen(&garment, self.sharpen_sigma, 0);
        }
        Ok((centred(&garment), background.light))
    }

    /// Everything within the tolerance becomes 0; the rest is stretched back over 0-255, so black on white
    /// stays 255.
    fn background_to_zero(&self, garment: &mut GrayImage) {
        let tolerance = u32::from(self.background_tolerance);
        if tolerance == 0 {
            return;
        }
        for p in garment.iter_mut() {
            let v = u32::from(*p).saturating_sub(tolerance);
            *p = ((v * 255 + (255 - tolerance) / 2) / (255 - tolerance)) as u8;
        }
    }
}

/// The background of a photo, estimated from its border: the median of each side (robust to a garment that
/// touches it, and to noise), taken as a plane, so that light falling off across the frame is background too.
#[derive(Debug, Clone, Copy)]
struct Background {
    top: f32,
    bottom: f32,
    left: f32,
    right: f32,
    /// A light background (a photo on white): the garment is darker than it, and is negated.
    light: bool,
}

impl Background {
    fn of(gray: &GrayImage) -> Background {
        let (w, h) = gray.dimensions();
        let row = |y: u32| median((0..w).map(|x| gray.get_pixel(x, y).0[0]));
        let col = |x: u32| median((0..h).map(|y| gray.get_pixel(x, y).0[0]));
        let (top, bottom, left, right) = (row(0), row(h - 1), col(0), col(w - 1));
        let border = median(
            (0..w)
                .flat_map(|x| [(x, 0), (x, h - 1)])
                .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]))
                .map(|(x, y)| gray.get_pixel(x, y).0[0]),
        );
        Background {
            top,
            bottom,
            left,
            right,
            light: border > 128.0,
        }
    }

    /// How far each pixel stands out from the background, as the dataset would have it: 0 for background,
    /// 255 for black on a light background (or white on a dark one). On a light background this is the
    /// pixel's darkness relative to the light falling there, `1 - pixel / background`, as a photo's
    /// reflectance is.
    fn ink(&self, gray: &GrayImage) -> GrayImage {
        let (w, h) = gray.dimensions();
        let (sx, sy) = (1.0 / (w.max(2) - 1) as f32, 1.0 / (h.max(2) - 1) as f32);
        let mut out = vec![0u8; gray.as_raw().len()];
        for (y, (row, out)) in gray
            .as_raw()
            .chunks_exact(w as usize)
            .zip(out.chunks_exact_mut(w as usize))
            .enumerate()
        {
            let row_level = self.top + (self.bottom - self.top) * (y as f32 * sy);
            let slope = self.right - self.left;
            for (x, (&p, o)) in row.iter().zip(out.iter_mut()).enumerate() {
                let level = row_level + slope * (x as f32 * sx - 0.5);
                let p = f32::from(p);
                let ink = if self.light {
                    let level = level.clamp(1.0, 255.0);
                    255.0 * (level - p) / level
                } else {
                    let level = level.clamp(0.0, 254.0);
                    255.0 * (p - level) / (255.0 - level)
                };
                *o = ink.clamp(0.0, 255.0).round() as u8;
            }
        }
        GrayImage::from_raw(w, h, out).expect("one byte per pixel")
    }
}

fn median(values: impl Iterator<Item = u8>) -> f32 {
    let mut histogram = [0u32; 256];
    let mut n = 0u32;
    for v in values {
        histogram[usize::from(v)] += 1;
        n += 1;
    }
    let mut seen = 0;
    for (v, &count) in histogram.iter().enumerate() {
        seen += count;
        if 2 * seen >= n {
            return v as f32;
        }
    }
    255.0
}

/// The smallest box holding every pixel that stands out from the background by more than `tolerance`; `None`
/// when nothing does. It is found on cells first, each the average of up to `k`x`k` pixels of a grid at most
/// [`SEARCH_SIDE`] cells long, so that noise does not count as content; then each edge is refined to the pixel
/// inside its edge cell, where at least two pixels of a row or column (and 1% of them) stand out.
fn content_box(ink: &GrayImage, tolerance: u8) -> Option<Content> {
    let (w, h) = ink.dimensions();
    let k = w.max(h).div_ceil(SEARCH_SIDE).max(1);
    let (cw, ch) = (w.div_ceil(k), h.div_ceil(k));
    let mut sums = vec![0u32; (cw * ch) as usize];
    let mut counts = vec![0u32; (cw * ch) as usize];
    for (y, row) in ink.as_raw().chunks_exact(w as usize).enumerate() {
        let cells = (y as u32 / k * cw) as usize;
        for (cx, pixels) in row.chunks(k as usize).enumerate() {
            sums[cells + cx] += pixels.iter().map(|&p| u32::from(p)).sum::<u32>();
            counts[cells + cx] += pixels.len() as u32;
        }
    }
    let (mut rows, mut cols) = (vec![false; ch as usize], vec![false; cw as usize]);
    for cy in 0..ch {
        for cx in 0..cw {
            let cell = (cy * cw + cx) as usize;
            if sums[cell] > u32::from(tolerance) * counts[cell] {
                rows[cy as usize] = true;
                cols[cx as usize] = true;
            }
        }
    }
    let span = |marks: &[bool]| {
        Some((
            marks.iter().position(|&m| m)? as u32,
            marks.iter().rposition(|&m| m)? as u32,
        ))
    };
    let ((cx0, cx1), (cy0, cy1)) = (span(&cols)?, span(&rows)?);
    let (x0, x1, y0, y1) = (cx0 * k, ((cx1 + 1) * k).min(w), cy0 * k, ((cy1 + 1) * k).min(h));
    let stands_out = |x: u32, y: u32| ink.get_pixel(x, y).0[0] > tolerance;
    let needed = |n: u32| (n / 100).max(2).min(n);
    let column = |x: u32| (y0..y1).filter(|&y| stands_out(x, y)).count() as u32 >= needed(y1 - y0);
    let row = |y: u32| (x0..x1).filter(|&x| stands_out(x, y)).count() as u32 >= needed(x1 - x0);
    // Within the edge cells only: where no pixel line qualifies (heavy noise), the cell's edge stays.
    let left = (x0..(x0 + k).min(x1)).find(|&x| column(x)).unwrap_or(x0);
    let right = (x1.saturating_sub(k).max(left)..x1)
        .rev()
        .find(|&x| column(x))
        .map_or(x1, |x| x + 1);
    let top = (y0..(y0 + k).min(y1)).find(|&y| row(y)).unwrap_or(y0);
    let bottom = (y1.saturating_sub(k).max(top)..y1)
        .rev()
        .find(|&y| row(y))
        .map_or(y1, |y| y + 1);
    Some(Content {
        x: left,
        y: top,
        w: right - left,
        h: bottom - top,
    })
}

/// The garment (at most 28 pixels a side) centred on a 28x28 background.
fn centred(garment: &GrayImage) -> Box<[u8; PIXELS]> {
    let side = SIDE as u32;
    let (w, h) = garment.dimensions();
    let (ox, oy) = ((side - w) / 2, (side - h) / 2);
    let mut out = Box::new([0u8; PIXELS]);
    for (x, y, p) in garment.enumerate_pixels() {
        out[((y + oy) * side + x + ox) as usize] = p.0[0];
    }
    out
}

/// The pixels' standard deviation, from their sum and sum of squares in integers: exact, and a loop the
/// compiler vectorises (a running `f32` sum is a chain of dependent additions, and was 5% of a raw call's
/// serving CPU; bench/README.md round 12).
fn standard_deviation(pixels: &[u8; PIXELS]) -> f32 {
    // At most 784 x 255^2 = 50,979,600: no u32 overflows.
    let sum: u32 = pixels.iter().map(|&p| u32::from(p)).sum();
    let squares: u32 = pixels.iter().map(|&p| u32::from(p) * u32::from(p)).sum();
    let n = PIXELS as f64;
    let mean = f64::from(sum) / n;
    (f64::from(squares) / n - mean * mean).max(0.0).sqrt() as f32
}

impl InputCheck {
    /// Rejects images with nothing to classify. `inverted` says the polarity step flipped the image: its near
    /// black pixels were near white as sent, and the reason describes the image as the client sees it.
    fn check(&self, pixels: &[u8; PIXELS], inverted: bool) -> Result<(), Rejection> {
        let n = PIXELS as f32;
        let dark = pixels.iter().filter(|&&p| p <= self.dark_level).count() as f32 / n;
        let bright = pixels.iter().filter(|&&p| p >= self.bright_level).count() as f32 / n;
        let std = standard_deviation(pixels);
        if std < self.min_contrast {
            return Err(Rejection::new(
                Reason::LowContrast,
                format!(
                    "pixel standard deviation {std:.1} is below the minimum contrast {:.1}: blank or uniform image",
                    self.min_contrast
                ),
            ));
        }
        // The limits apply to the model input; the reason and the detail describe the image as the client sent
        // it, and name the limit that applied: a light photo is negated, so its near-white pixels are the model
        // input's near-black ones, and `max_dark_fraction` is their limit.
        let (dark_reason, dark_name, bright_reason, bright_name) = if inverted {
            (
                Reason::MostlyBright,
                "white as sent (the background, near black once negated)",
                Reason::MostlyDark,
                "black as sent (near white once negated)",
            )
        } else {
            (Reason::MostlyDark, "black", Reason::MostlyBright, "white")
        };
        if dark > self.max_dark_fraction {
            return Err(Rejection::new(
                dark_reason,
                format!(
                    "{:.1}% of pixels are near {dark_name}, over the limit max_dark_fraction = {:.1}%: nothing to classify",
                    dark * 100.0,
                    self.max_dark_fraction * 100.0
                ),
            ));
        }
        if bright > self.max_bright_fraction {
            return Err(Rejection::new(
                bright_reason,
                format!(
                    "{:.1}% of pixels are near {bright_name}, over the limit max_bright_fraction = {:.1}%",
                    bright * 100.0,
                    self.max_bright_fraction * 100.0
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use image::{ImageFormat, Luma, Rgba};
    use proptest::prelude::*;

    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_dimension: 8192,
        max_alloc_bytes: 128 << 20,
    };
    const CHECK: InputCheck = InputCheck {
        dark_level: 10,
        bright_level: 245,
        max_dark_fraction: 0.95,
        max_bright_fraction: 0.80,
        min_contrast: 10.0,
    };
    const CONVERSION: UploadConversion = UploadConversion {
        background_tolerance: 16,
        sharpen_sigma: 0.75,
    };
    const SETTINGS: PreprocessSettings = PreprocessSettings {
        limits: LIMITS,
        conversion: CONVERSION,
        check: CHECK,
    };

    /// A garment-like test pattern: a light ellipse on a dark background.
    fn garment() -> [u8; PIXELS] {
        let mut p = [0u8; PIXELS];
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (dx, dy) = (x as f32 - 13.5, y as f32 - 13.5);
                if dx * dx / 100.0 + dy * dy / 160.0 < 1.0 {
                    p[y * SIDE + x] = 120 + (x * 4) as u8;
                }
            }
        }
        p
    }

    /// `png` with a chunk of `kind` holding `data` inserted after IHDR.
    fn with_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let ihdr_end = 8 + 12 + 13;
        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
        chunk.extend_from_slice(kind);
        chunk.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        chunk.extend_from_slice(&crc.sum().to_be_bytes());
        [&png[..ihdr_end], &chunk[..], &png[ihdr_end..]].concat()
    }

    #[test]
    fn a_pngs_ancillary_chunks_are_never_inflated() {
        use std::io::Write;
        let p = garment();
        let png = encode(&gray(&p, 28, 28), ImageFormat::Png);
        // An ICC profile that inflates to 48 MiB, in a file of about 49 KB.
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        zlib.write_all(&vec![0u8; 48 << 20]).unwrap();
        let mut iccp = b"bomb\0\0".to_vec();
        iccp.extend_from_slice(&zlib.finish().unwrap());
        let bomb = with_chunk(&png, b"iCCP", &iccp);
        assert!(bomb.len() < 100_000, "{} bytes", bomb.len());

        assert_eq!(declared_pixels(&bomb, &LIMITS), Some(784), "read from IHDR");
        let kept = png_pixel_chunks(&bomb).unwrap();
        assert!(
            !kept.windows(4).any(|w| w == b"iCCP"),
            "the profile is dropped before decoding"
        );
        assert_eq!(kept, png, "the pixel chunks stay as they were");
        assert_eq!(
            *preprocess(ImageData::Encoded(&bomb), &SETTINGS).unwrap().pixels,
            p,
            "the same pixels as without the chunk"
        );
        // Transparency is ancillary too, but it changes the pixels: it stays.
        let trns = with_chunk(&png, b"tRNS", &[0, 0]);
        assert_eq!(png_pixel_chunks(&trns).unwrap(), trns);
        assert_eq!(png_pixel_chunks(b"not a png"), None);
    }

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn gray(pixels: &[u8], w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, pixels.to_vec()).unwrap())
    }

    #[test]
    fn the_contrast_checked_is_the_pixels_standard_deviation() {
        let two_pass = |pixels: &[u8; PIXELS]| {
            let n = PIXELS as f64;
            let mean = pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / n;
            (pixels.iter().map(|&p| (f64::from(p) - mean).powi(2)).sum::<f64>() / n).sqrt()
        };
        let mut half = [0u8; PIXELS];
        half[..PIXELS / 2].fill(255);
        let ramp: [u8; PIXELS] = std::array::from_fn(|i| (i % 256) as u8);
        for (name, pixels) in [
            ("blank", [0u8; PIXELS]),
            ("white", [255; PIXELS]),
            ("grey", [77; PIXELS]),
            ("half", half),
            ("ramp", ramp),
            ("garment", garment()),
        ] {
            let (got, want) = (f64::from(standard_deviation(&pixels)), two_pass(&pixels));
            assert!((got - want).abs() < 1e-4, "{name}: {got} against {want}");
        }
        assert_eq!(standard_deviation(&half), 127.5);
        // Exactly at the default minimum contrast (10): the check is `std < min_contrast`, so this one passes.
        let two_levels: [u8; PIXELS] = std::array::from_fn(|i| if i % 2 == 0 { 100 } else { 120 });
        assert_eq!(standard_deviation(&two_levels), 10.0);
    }

    #[test]
    fn raw_pixels_are_used_as_they_are() {
        let p = garment();
        let input = preprocess(ImageData::Raw(&p), &SETTINGS).unwrap();
        assert_eq!(*input.pixels, p);
    }

    #[test]
    fn a_28x28_png_gives_exactly_the_raw_pixels() {
        let p = garment();
        let png = encode(&gray(&p, 28, 28), ImageFormat::Png);
        assert_eq!(*preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap().pixels, p);
    }

    #[test]
    fn scaling_is_pixel_over_255() {
        let mut p = garment();
        p[0] = 255;
        let input = ModelInput::from_pixels(Box::new(p));
        let mut out = vec![0.0; PIXELS];
        input.write_scaled(&mut out);
        assert_eq!(out[0], 1.0);
        assert_eq!(out[PIXELS - 1], 0.0);
        assert_eq!(out[14 * 28 + 14], f32::from(p[14 * 28 + 14]) / 255.0);
    }

    #[test]
    fn a_light_background_is_inverted_to_the_dataset_polarity() {
        let p = garment();
        let inverted: Vec<u8> = p.iter().map(|v| 255 - v).collect();
        let png = encode(&gray(&inverted, 28, 28), ImageFormat::Png);
        assert_eq!(*preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap().pixels, p);
    }

    #[test]
    fn a_wide_image_is_trimmed_to_its_content_fitted_keeping_its_aspect_ratio_and_centred() {
        // A 108x52 light rectangle on a dark 2-pixel border: the border is trimmed, the rectangle becomes
        // 28x13, centred vertically.
        let img = GrayImage::from_fn(112, 56, |x, y| {
            Luma([if (2..110).contains(&x) && (2..54).contains(&y) {
                200
            } else {
                0
            }])
        });
        let png = encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png);
        let out = preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap().pixels;
        let rows_with_ink: Vec<usize> = (0..SIDE)
            .filter(|y| out[y * SIDE..(y + 1) * SIDE].iter().any(|&v| v > 100))
            .collect();
        assert_eq!(rows_with_ink.first(), Some(&7));
        assert_eq!(rows_with_ink.last(), Some(&19));
        assert!(out[..7 * SIDE].iter().all(|&v| v == 0), "padding is background");
        assert!(out[20 * SIDE..].iter().all(|&v| v == 0), "padding is background");
        assert!(
            (0..SIDE).all(|x| out[10 * SIDE + x] > 100),
            "the rectangle spans the width"
        );
    }

    /// A photo of `garment` (28x28, 0 = background) as a shop takes it: the garment's pixels scaled up by
    /// `scale` (nearest neighbour), dark on a `background` level, at (`left`, `top`) of a `w`x`h` frame.
    fn photo(garment: &[u8; PIXELS], scale: u32, background: u8, frame: (u32, u32), at: (u32, u32)) -> Vec<u8> {
        lit_photo(garment, scale, frame, at, |_, _| f32::from(background), || 0)
    }

    /// [`photo`] under `light(x, y)`, with `noise()` added to each pixel.
    fn lit_photo(
        garment: &[u8; PIXELS],
        scale: u32,
        (w, h): (u32, u32),
        (left, top): (u32, u32),
        light: impl Fn(u32, u32) -> f32,
        mut noise: impl FnMut() -> i32,
    ) -> Vec<u8> {
        let img = GrayImage::from_fn(w, h, |x, y| {
            let inside = (left..left + 28 * scale).contains(&x) && (top..top + 28 * scale).contains(&y);
            let v = if inside {
                garment[(((y - top) / scale) * 28 + (x - left) / scale) as usize]
            } else {
                0
            };
            // Reflectance: the garment darkens the light falling on it; v = 255 is black.
            let clean = (light(x, y) * (1.0 - f32::from(v) / 255.0)).round() as i32;
            Luma([(clean + noise()).clamp(0, 255) as u8])
        });
        encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png)
    }

    /// The model input of an encoded image that preprocessing accepts.
    fn model_input(encoded: &[u8]) -> Box<[u8; PIXELS]> {
        preprocess(ImageData::Encoded(encoded), &SETTINGS).unwrap().pixels
    }

    /// The model input of `garment` photographed filling the frame, on white: what every other photo of it is
    /// held against.
    fn filling_the_frame(garment: &[u8; PIXELS]) -> Box<[u8; PIXELS]> {
        model_input(&photo(garment, 4, 255, (112, 112), (0, 0)))
    }

    fn max_difference(a: &[u8; PIXELS], b: &[u8; PIXELS]) -> u8 {
        a.iter().zip(b.iter()).map(|(a, b)| a.abs_diff(*b)).max().unwrap()
    }

    #[test]
    fn a_garment_with_a_margin_gives_the_input_it_gives_filling_the_frame() {
        let p = garment();
        let filling = filling_the_frame(&p);
        for (frame, at) in [((224, 224), (56, 56)), ((400, 300), (17, 150)), ((560, 560), (300, 20))] {
            let with_margin = model_input(&photo(&p, 4, 255, frame, at));
            assert_eq!(
                max_difference(&with_margin, &filling),
                0,
                "a {frame:?} frame with the garment at {at:?}"
            );
        }
    }

    #[test]
    fn an_off_white_background_becomes_exactly_zero_and_black_stays_255() {
        let mut p = garment();
        for y in 12..17 {
            p[y * 28 + 12..y * 28 + 17].fill(255);
        }
        let on_white = preprocess(ImageData::Encoded(&photo(&p, 4, 255, (224, 224), (56, 56))), &SETTINGS)
            .unwrap()
            .pixels;
        assert_eq!(on_white.iter().max(), Some(&255), "black stays black");
        for background in [235, 200] {
            let input = preprocess(
                ImageData::Encoded(&photo(&p, 4, background, (224, 224), (56, 56))),
                &SETTINGS,
            )
            .unwrap()
            .pixels;
            assert!(max_difference(&input, &on_white) <= 3, "background {background}");
            for (i, (&got, &white)) in input.iter().zip(on_white.iter()).enumerate() {
                if white == 0 {
                    assert_eq!(got, 0, "background {background}: pixel {i} is background");
                }
            }
            assert_eq!(input[0], 0, "background {background}");
        }
    }

    #[test]
    fn light_falling_off_across_the_frame_is_background_too() {
        let p = garment();
        let falling = |x: u32, y: u32| 250.0 - 40.0 * (x + y) as f32 / 600.0;
        let png = lit_photo(&p, 4, (300, 300), (94, 94), falling, || 0);
        let difference = max_difference(&model_input(&png), &filling_the_frame(&p));
        assert!(difference <= 12, "{difference}");
    }

    #[test]
    fn noise_on_the_background_does_not_widen_the_crop() {
        let p = garment();
        let mut seed = 7u32;
        let noise = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((seed >> 24) % 17) as i32 - 8
        };
        let png = lit_photo(&p, 4, (300, 300), (94, 94), |_, _| 240.0, noise);
        let difference = max_difference(&model_input(&png), &filling_the_frame(&p));
        assert!(difference <= 16, "{difference}");
    }

    #[test]
    fn a_dot_or_a_line_on_white_is_a_tiny_object() {
        let mark = |(x0, x1): (u32, u32), (y0, y1): (u32, u32)| {
            let img = GrayImage::from_fn(400, 400, |x, y| {
                Luma([if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                    0
                } else {
                    250
                }])
            });
            let err = preprocess(
                ImageData::Encoded(&encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png)),
                &SETTINGS,
            )
            .unwrap_err();
            assert_eq!(err.reason, Reason::TinyObject, "{}", err.detail);
            err.detail
        };
        assert!(mark((200, 206), (100, 106)).contains("a dot"));
        assert!(mark((50, 350), (200, 203)).contains("a line"));
        assert!(mark((200, 203), (20, 380)).contains("a line"));
    }

    #[test]
    fn a_blank_photo_is_low_contrast() {
        for level in [0u8, 128, 240, 255] {
            let img = gray(&vec![level; 200 * 150], 200, 150);
            let err = preprocess(ImageData::Encoded(&encode(&img, ImageFormat::Png)), &SETTINGS).unwrap_err();
            assert_eq!(err.reason, Reason::LowContrast, "level {level}: {}", err.detail);
        }
    }

    #[test]
    fn transparency_is_composited_over_white_then_inverted() {
        // A dark garment on a fully transparent background (as cut-out product shots are).
        let img = image::RgbaImage::from_fn(28, 28, |x, y| {
            let inside = garment()[(y * 28 + x) as usize] > 0;
            if inside {
                Rgba([40, 40, 40, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
        let out = preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap().pixels;
        assert_eq!(out[0], 0, "transparent background becomes the dataset's black");
        assert_eq!(out[14 * 28 + 14], 255 - 40, "the garment becomes light");
    }

    #[test]
    fn sixteen_bit_and_rgb_images_are_converted_to_8_bit_gray() {
        let p = garment();
        let img16 = image::ImageBuffer::<Luma<u16>, _>::from_fn(28, 28, |x, y| {
            Luma([u16::from(p[(y * 28 + x) as usize]) * 257])
        });
        let png16 = encode(&DynamicImage::ImageLuma16(img16), ImageFormat::Png);
        assert_eq!(*preprocess(ImageData::Encoded(&png16), &SETTINGS).unwrap().pixels, p);
        let rgb = DynamicImage::ImageLuma8(GrayImage::from_raw(28, 28, p.to_vec()).unwrap()).to_rgb8();
        let bmp = encode(&DynamicImage::ImageRgb8(rgb), ImageFormat::Bmp);
        assert_eq!(*preprocess(ImageData::Encoded(&bmp), &SETTINGS).unwrap().pixels, p);
    }

    #[test]
    fn each_blank_kind_of_image_has_its_own_reason() {
        let reason = |p: &[u8]| preprocess(ImageData::Raw(p), &SETTINGS).unwrap_err().reason;
        assert_eq!(reason(&[0u8; PIXELS]), Reason::LowContrast);
        assert_eq!(reason(&[255u8; PIXELS]), Reason::LowContrast);
        let mut dark = [0u8; PIXELS];
        dark[..30].fill(255);
        assert_eq!(reason(&dark), Reason::MostlyDark);
        let mut bright = [255u8; PIXELS];
        bright[..30].fill(0);
        assert_eq!(reason(&bright), Reason::MostlyBright);
        assert_eq!(reason(&[1u8; 100]), Reason::WrongSize);
    }

    #[test]
    fn an_almost_white_photo_is_reported_as_mostly_bright_with_the_limit_that_applied() {
        // As sent: a white page with two small dark marks in opposite corners, so trimming keeps the page. The
        // polarity step negates it: the limit is the model input's near-black one, and the detail says so.
        let img = GrayImage::from_fn(100, 100, |x, y| {
            let mark = |c: u32| (c..c + 6).contains(&x) && (c..c + 6).contains(&y);
            Luma([if mark(2) || mark(92) { 0 } else { 255 }])
        });
        let png = encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png);
        let err = preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap_err();
        assert_eq!(err.reason, Reason::MostlyBright, "{}", err.detail);
        assert!(err.detail.contains("near white as sent"), "{}", err.detail);
        assert!(err.detail.contains("max_dark_fraction = 95.0%"), "{}", err.detail);
        // Not negated: near white is near white, and its own limit applies.
        let mut bright = [255u8; PIXELS];
        bright[..100].fill(0);
        let err = preprocess(ImageData::Raw(&bright), &SETTINGS).unwrap_err();
        assert_eq!(err.reason, Reason::MostlyBright, "{}", err.detail);
        assert!(err.detail.contains("max_bright_fraction = 80.0%"), "{}", err.detail);
    }

    #[test]
    fn a_small_file_declaring_a_huge_image_is_too_large_not_an_allocation() {
        let mut png = encode(&gray(&[0u8; 16], 4, 4), ImageFormat::Png);
        png[16..24].copy_from_slice(&[0, 0, 0xC3, 0x50, 0, 0, 0xC3, 0x50]); // IHDR: 50,000 x 50,000
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let started = Instant::now();
        let err = preprocess(ImageData::Encoded(&png), &SETTINGS).unwrap_err();
        assert_eq!(err.reason, Reason::TooLarge, "{}", err.detail);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_image_over_the_allocation_limit_is_too_large() {
        let img = gray(&vec![7u8; 600 * 600], 600, 600);
        let png = encode(&img, ImageFormat::Png);
        let small = PreprocessSettings {
            limits: DecodeLimits {
                max_dimension: 8192,
                max_alloc_bytes: 100_000,
            },
            ..SETTINGS
        };
        assert_eq!(
            preprocess(ImageData::Encoded(&png), &small).unwrap_err().reason,
            Reason::TooLarge
        );
    }

    #[test]
    fn the_first_frame_of_an_animated_gif_is_used() {
        use image::{Delay, Frame, codecs::gif::GifEncoder};
        let p = garment();
        let frame = |v: &[u8]| {
            let rgba = gray(v, 28, 28).to_rgba8();
            Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(100, 1))
        };
        let mut gif = Vec::new();
        {
            let mut enc = GifEncoder::new(&mut gif);
            enc.encode_frames(vec![frame(&p), frame(&[0u8; PIXELS])]).unwrap();
        }
        let out = preprocess(ImageData::Encoded(&gif), &SETTINGS).unwrap().pixels;
        let diff = out
            .iter()
            .zip(p.iter())
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap();
        assert!(
            diff <= 8,
            "first frame, up to GIF palette quantisation (max diff {diff})"
        );
    }

    #[test]
    fn corrupt_and_truncated_files_are_undecodable() {
        let png = encode(&gray(&garment(), 28, 28), ImageFormat::Png);
        let jpeg = encode(&gray(&garment(), 28, 28), ImageFormat::Jpeg);
        for bytes in [
            &png[..50],
            &jpeg[..jpeg.len() / 2],
            b"GIF89a",
            &[],
            b"\x89PNG\r\n\x1a\n garbage",
        ] {
            let err = preprocess(ImageData::Encoded(bytes), &SETTINGS).unwrap_err();
            assert_eq!(err.reason, Reason::Undecodable, "{} bytes: {}", bytes.len(), err.detail);
        }
    }

    proptest! {
        // 2,000 cases per property in `make test`; PROPTEST_CASES=1000000 for the long campaign.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
            ..ProptestConfig::default()
        })]

        /// Arbitrary bytes never panic and are answered quickly, as encoded or as raw data.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let started = Instant::now();
            let _ = preprocess(ImageData::Encoded(&bytes), &SETTINGS);
            let _ = preprocess(ImageData::Raw(&bytes), &SETTINGS);
            prop_assert!(started.elapsed() < Duration::from_secs(1));
        }

        /// Valid files of every accepted format, mutated (bytes replaced, inserted, cut), with PNG checksums
        /// made valid again so the mutations reach the decoder instead of its CRC check; for PNG also the
        /// filtered scanlines themselves, recompressed. Never a panic, always a quick answer, and the same
        /// answer twice; an accepted result is a model input that the raw path accepts unchanged.
        #[test]
        fn mutated_images_of_every_accepted_format_never_panic(
            seed in 0..SEEDS.len(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0..4u8), 1..8),
            in_scanlines in any::<bool>(),
        ) {
            let (format, original) = &SEEDS[seed];
            let bytes = if *format == ImageFormat::Png && in_scanlines {
                png_with_mutated_scanlines(original, &edits)
            } else {
                let mut bytes = original.clone();
                mutate(&mut bytes, &edits);
                if *format == ImageFormat::Png {
                    fix_png_crcs(&mut bytes);
                }
                bytes
            };
            let started = Instant::now();
            let first = preprocess(ImageData::Encoded(&bytes), &SETTINGS);
            prop_assert!(started.elapsed() < Duration::from_secs(1));
            prop_assert_eq!(&first, &preprocess(ImageData::Encoded(&bytes), &SETTINGS));
            if let Ok(input) = first {
                let raw = preprocess(ImageData::Raw(&input.pixels[..]), &SETTINGS);
                prop_assert_eq!(raw, Ok(input));
            }
        }
    }

    /// One valid small file per accepted format (PNG twice: 8-bit gray and RGBA), made with the encoders
    /// this build has.
    static SEEDS: std::sync::LazyLock<Vec<(ImageFormat, Vec<u8>)>> = std::sync::LazyLock::new(|| {
        let g = gray(&garment(), 28, 28);
        let rgba = DynamicImage::ImageRgba8(g.to_rgba8());
        let rgb = DynamicImage::ImageRgb8(g.to_rgb8());
        let seeds = vec![
            (ImageFormat::Png, encode(&g, ImageFormat::Png)),
            (ImageFormat::Png, encode(&rgba, ImageFormat::Png)),
            (ImageFormat::Jpeg, encode(&rgb, ImageFormat::Jpeg)),
            (ImageFormat::Gif, encode(&rgba, ImageFormat::Gif)),
            (ImageFormat::Bmp, encode(&rgb, ImageFormat::Bmp)),
            (ImageFormat::WebP, encode(&rgba, ImageFormat::WebP)),
            (ImageFormat::Tiff, encode(&g, ImageFormat::Tiff)),
        ];
        for (format, bytes) in &seeds {
            assert!(
                preprocess(ImageData::Encoded(bytes), &SETTINGS).is_ok(),
                "{format:?} seed decodes"
            );
        }
        assert!(ACCEPTED_FORMATS.iter().all(|f| seeds.iter().any(|(s, _)| s == f)));
        seeds
    });

    /// Applies each edit: 0-1 replace the byte at `at`, 2 inserts `value` there, 3 cuts the file there.
    fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)]) {
        for &(at, value, kind) in edits {
            if bytes.is_empty() {
                return;
            }
            let i = at % bytes.len();
            match kind {
                0 | 1 => bytes[i] = value,
                2 => bytes.insert(i, value),
                _ => bytes.truncate(i.max(1)),
            }
        }
    }

    /// Recomputes every chunk's CRC, as far as the chunk lengths make sense.
    fn fix_png_crcs(png: &mut [u8]) {
        let mut at = 8;
        while at + 12 <= png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let Some(end) = (at + 8).checked_add(len).filter(|e| e + 4 <= png.len()) else {
                return;
            };
            let mut crc = flate2::Crc::new();
            crc.update(&png[at + 4..end]);
            png[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
            at = end + 4;
        }
    }

    /// The PNG with its decompressed image data (filter bytes and pixels) mutated, recompressed as one IDAT
    /// with a valid zlib stream and CRC.
    fn png_with_mutated_scanlines(png: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
        use std::io::{Read, Write};
        let (mut idat, mut at) = (Vec::new(), 8);
        let mut ihdr = Vec::new();
        while at + 12 <= png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let (kind, data) = (&png[at + 4..at + 8], &png[at + 8..at + 8 + len]);
            match kind {
                b"IHDR" => ihdr = png[at..at + 12 + len].to_vec(),
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            at += 12 + len;
        }
        let mut scanlines = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut scanlines)
            .unwrap();
        mutate(&mut scanlines, edits);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&scanlines).unwrap();
        let compressed = z.finish().unwrap();
        let mut out = png[..8].to_vec();
        out.extend_from_slice(&ihdr);
        for (kind, data) in [(&b"IDAT"[..], &compressed[..]), (&b"IEND"[..], &[][..])] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&[0; 4]);
        }
        fix_png_crcs(&mut out);
        out
    }
}
