# fmnist-serve: the gRPC Fashion-MNIST classifier as a small, non-root, read-only-friendly image.
#
#   build    Rust toolchain + protoc; dependencies compiled in their own layer (cached until Cargo.toml,
#            Cargo.lock, build.rs or the proto change), then the sources.
#   ort      the ONNX Runtime shared library, from the onnxruntime==1.31.1 wheel on PyPI (scripts/fetch-ort.sh).
#   runtime  distroless cc (glibc, libstdc++, no shell, no package manager), uid 65532: the binary, the ORT
#            library and the models, all owned by root and read-only to the server.
#
# Build: podman build -t fmnist-serve .   (or docker build; scripts/container-check.sh builds, runs and checks)
# Versions are pinned here and nowhere else in the image: bump RUST_VERSION with rust-version in Cargo.toml.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# protoc: tonic-prost-build compiles proto/ in build.rs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler=3.21.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependency layer: the manifest, lock file, build script and proto with stub sources. Editing src/ reuses it.
COPY Cargo.toml Cargo.lock build.rs ./
# The image builds the library and the fmnist binary only. Cargo refuses a manifest whose declared [[bench]],
# [[test]] or [[example]] files are missing, and those stay out of the context: drop their tables (the
# dependencies, hence Cargo.lock, do not change).
RUN awk '/^\[/ { skip = /^\[\[(bench|test|example)\]\]/ } !skip' Cargo.toml > Cargo.image.toml \
    && mv Cargo.image.toml Cargo.toml
COPY proto proto
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
# COPY keeps the context's mtimes, which may be older than the stub build: touch so cargo rebuilds the crate.
# strip --strip-debug drops the line tables (60 MB -> 10 MB) and keeps symbols, so backtraces still name functions.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip --strip-debug target/release/fmnist \
    && ./target/release/fmnist --version

FROM docker.io/library/python:3.11-slim-bookworm AS ort
WORKDIR /src
COPY scripts/fetch-ort.sh scripts/
RUN bash scripts/fetch-ort.sh

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
# Least-changing first: the runtime library, then the models, then the binary.
COPY --from=ort /src/.ort/libonnxruntime.so.1.31.1 /app/lib/
# The model repository as it is: models/<name>/<version>/model.{onnx,json} (plots are left out by .dockerignore).
COPY models/ /app/models/
COPY --from=build /src/target/release/fmnist /app/fmnist
ENV ORT_DYLIB_PATH=/app/lib/libonnxruntime.so.1.31.1 \
    FMNIST_MODELS_DIR=/app/models \
    FMNIST_LISTEN=0.0.0.0:50051 \
    FMNIST_METRICS_LISTEN=0.0.0.0:9090
# distroless's "nonroot" user, numeric so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 50051: gRPC, gRPC-Web and the browser page; 9090: Prometheus /metrics.
EXPOSE 50051 9090
ENTRYPOINT ["/app/fmnist"]
CMD ["serve"]
