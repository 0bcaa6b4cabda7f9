use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // The descriptor set feeds gRPC server reflection, so grpcurl works without the .proto files.
        .file_descriptor_set_path(out.join("descriptor.bin"))
        // Maps are read into BTreeMap so parameters are walked in a stable order.
        .btree_map(".")
        // prost's codec with the element counts of each request bounded before it is decoded (src/transport/codec.rs).
        .codec_path("crate::transport::codec::BoundedCodec")
        .compile_protos(
            &[
                "proto/fashion_mnist/v1/classifier.proto",
                "proto/inference/grpc_predict_v2.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
