use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // The descriptor set feeds gRPC server reflection, so grpcurl works without the .proto files.
        .file_descriptor_set_path(out.join("fashion_mnist_descriptor.bin"))
        .compile_protos(&["proto/fashion_mnist/v1/classifier.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
