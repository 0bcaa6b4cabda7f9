//! Bytes in, the model's 28x28 input out: the one preprocessing path shared by the server, the CLI, the tests
//! and the benches.
//!
//! Encoded images: decode (with explicit limits) → grayscale (alpha composited over white) → polarity (a light
//! border means a photo on a light background: invert to the dataset's dark background) → fit into 28x28
//! keeping the aspect ratio, centred on background. Raw 784-byte images are taken as they are. Both then go
//! through the same input check, and [`ModelInput::write_scaled`] is the only place that knows the model wants
//! `pixel / 255`.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageError, ImageReader, imageops::FilterType};

/// Side of the model's square input.
pub const SIDE: usize = 28;
/// Pixels per model input.
pub const PIXELS: usize = SIDE * SIDE;

/// One image as a client sent it.
#[derive(Debug, Clone, Copy)]
pub enum ImageData<'a> {
    /// An encoded file (PNG, JPEG, GIF, BMP, WebP, TIFF, ...).
    Encoded(&'a [u8]),
    /// 28x28 8-bit grayscale, row-major, 0 = background.
    Raw(&'a [u8]),
}

/// Why an image is not classified, or not accepted. Mirrors the proto `Reason` enum; `api` maps between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Accepted,
    LowConfidence,
    MostlyDark,
    MostlyBright,
    LowContrast,
    Undecodable,
    WrongSize,
    TooLarge,
    OutOfDistribution,
}

impl Reason {
    /// Stable snake_case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Accepted => "accepted",
            Reason::LowConfidence => "low_confidence",
            Reason::MostlyDark => "mostly_dark",
            Reason::MostlyBright => "mostly_bright",
            Reason::LowContrast => "low_contrast",
            Reason::Undecodable => "undecodable",
            Reason::WrongSize => "wrong_size",
            Reason::TooLarge => "too_large",
            Reason::OutOfDistribution => "out_of_distribution",
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInput {
    pub pixels: Box<[u8; PIXELS]>,
}

impl ModelInput {
    /// Writes the tensor values the model expects (`pixel / 255`, see models/*.json `input.scaling`).
    pub fn write_scaled(&self, out: &mut [f32]) {
        for (o, &p) in out.iter_mut().zip(self.pixels.iter()) {
            *o = f32::from(p) * (1.0 / 255.0);
        }
    }
}

/// Limits applied while decoding, so a small file declaring a huge image cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted width or height, in pixels.
    pub max_dimension: u32,
    /// Largest buffer the decoder may allocate, in bytes.
    pub max_alloc_bytes: u64,
}

/// Thresholds of the input check (see README "Input check calibration" for how the defaults were chosen).
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

/// Turns one client image into the model's input, or says why it cannot be classified.
pub fn preprocess(image: ImageData<'_>, limits: &DecodeLimits, check: &InputCheck) -> Result<ModelInput, Rejection> {
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
        ImageData::Encoded(bytes) => {
            let gray = decode_grayscale(bytes, limits)?;
            let inverted = has_light_border(&gray);
            let gray = if inverted { invert(gray) } else { gray };
            (fit_to_model(&gray), inverted)
        }
    };
    match check.check(&pixels, inverted) {
        Ok(()) => Ok(ModelInput { pixels }),
        Err(mut rejection) => {
            rejection.pixels = Some(pixels);
            Err(rejection)
        }
    }
}

fn decode_grayscale(bytes: &[u8], limits: &DecodeLimits) -> Result<GrayImage, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new(Reason::Undecodable, "image is empty (0 bytes)"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Rejection::new(Reason::Undecodable, format!("cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(Rejection::new(
            Reason::Undecodable,
            "unrecognised image format (send PNG, JPEG, GIF, BMP, WebP, TIFF, ... or 784 raw bytes)",
        ));
    }
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_dimension);
    image_limits.max_image_height = Some(limits.max_dimension);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(image_limits);
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

fn invert(mut gray: GrayImage) -> GrayImage {
    image::imageops::invert(&mut gray);
    gray
}

/// Scales the longest side to 28 and centres the result on background. A 28x28 image passes unchanged, so a
/// dataset image sent as PNG gives exactly the same input as the same image sent raw.
fn fit_to_model(gray: &GrayImage) -> Box<[u8; PIXELS]> {
    let (w, h) = gray.dimensions();
    let side = SIDE as u32;
    let resized;
    let src = if (w, h) == (side, side) {
        gray
    } else {
        let scale = f64::from(side) / f64::from(w.max(h));
        let nw = ((f64::from(w) * scale).round() as u32).clamp(1, side);
        let nh = ((f64::from(h) * scale).round() as u32).clamp(1, side);
        resized = image::imageops::resize(gray, nw, nh, FilterType::Triangle);
        &resized
    };
    let (sw, sh) = src.dimensions();
    let (ox, oy) = ((side - sw) / 2, (side - sh) / 2);
    let mut out = Box::new([0u8; PIXELS]);
    for (x, y, p) in src.enumerate_pixels() {
        out[((y + oy) * side + x + ox) as usize] = p.0[0];
    }
    out
}

impl InputCheck {
    /// Rejects images with nothing to classify. `inverted` says the polarity step flipped the image: its near
    /// black pixels were near white as sent, and the reason describes the image as the client sees it.
    fn check(&self, pixels: &[u8; PIXELS], inverted: bool) -> Result<(), Rejection> {
        let n = PIXELS as f32;
        let dark = pixels.iter().filter(|&&p| p <= self.dark_level).count() as f32 / n;
        let bright = pixels.iter().filter(|&&p| p >= self.bright_level).count() as f32 / n;
        let mean = pixels.iter().map(|&p| f32::from(p)).sum::<f32>() / n;
        let var = pixels.iter().map(|&p| (f32::from(p) - mean).powi(2)).sum::<f32>() / n;
        let std = var.sqrt();
        if std < self.min_contrast {
            return Err(Rejection::new(
                Reason::LowContrast,
                format!(
                    "pixel standard deviation {std:.1} is below the minimum contrast {:.1}: blank or uniform image",
                    self.min_contrast
                ),
            ));
        }
        // Thresholds apply to the model input; the reason and detail describe the image as the client sent it.
        let (dark_name, bright_name) = if inverted {
            ("white", "black")
        } else {
            ("black", "white")
        };
        let (dark_reason, bright_reason) = if inverted {
            (Reason::MostlyBright, Reason::MostlyDark)
        } else {
            (Reason::MostlyDark, Reason::MostlyBright)
        };
        if dark > self.max_dark_fraction {
            return Err(Rejection::new(
                dark_reason,
                format!(
                    "{:.1}% of pixels are near {dark_name} (limit {:.1}%): nothing to classify",
                    dark * 100.0,
                    self.max_dark_fraction * 100.0
                ),
            ));
        }
        if bright > self.max_bright_fraction {
            return Err(Rejection::new(
                bright_reason,
                format!(
                    "{:.1}% of pixels are near {bright_name} (limit {:.1}%)",
                    bright * 100.0,
                    self.max_bright_fraction * 100.0
                ),
            ));
        }
        Ok(())
    }
}
