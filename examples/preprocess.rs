//! Runs the service's own preprocessing over a folder of image files, for offline evaluations (the OOD set):
//! writes `<out>.u8` (784 bytes per image that decoded) and `<out>.tsv` (file, reason, detail).
//!
//!     cargo run --release --example preprocess -- build/ood/photos build/ood/photos

use std::{fmt::Write as _, path::PathBuf};

use fmnist_serve::{
    config::Config,
    preprocess::{ImageData, preprocess},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: preprocess <image-folder> <output-prefix>".into());
    };
    let config = Config::defaults();
    let settings = config.preprocess_settings();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let (mut pixels, mut table) = (Vec::new(), String::from("file\treason\tdetail\n"));
    for file in files {
        let bytes = std::fs::read(&file)?;
        let (reason, detail, image) = match preprocess(ImageData::Encoded(&bytes), &settings) {
            Ok(input) => ("accepted_by_input_check", String::new(), Some(input.pixels)),
            Err(r) => (r.reason.label(), r.detail, r.pixels),
        };
        if let Some(image) = image {
            pixels.extend_from_slice(&image[..]);
            writeln!(table, "{}\t{reason}\t{detail}", file.display())?;
        } else {
            writeln!(table, "{}\t{reason}\t{detail} (no pixels)", file.display())?;
        }
    }
    std::fs::write(format!("{out}.u8"), pixels)?;
    std::fs::write(format!("{out}.tsv"), table)?;
    Ok(())
}
