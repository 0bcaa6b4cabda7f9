#!/usr/bin/env bash
# Builds the image from the Dockerfile with podman, then runs the rendered Kubernetes manifests with it under
# `podman kube play` (scripts/kube-play-check.sh: uid 65532, read-only root, no capabilities and the memory
# limit, all from the manifests) and checks them through the published ports only: gRPC health SERVING, a real
# Classify and ModelInfer, /metrics, and a SIGTERM drain with calls in flight.
# `make image` runs it. Each step prints how long it took. Safe to re-run: every step skips what is done.
#
# Base images. On a machine with a registry, podman pulls what the Dockerfile's FROM lines name. Where there is
# no registry (this project's machines), the script builds local stand-ins under exactly those names, once,
# and only when a name is missing:
#   docker.io/library/rust:1.95-slim-bookworm   debootstrapped bookworm + gcc + this machine's Rust 1.95 toolchain
#   docker.io/library/python:3.11-slim-bookworm bookworm + Debian's python3-pip (python 3.11)
#   gcr.io/distroless/cc-debian12:nonroot       glibc, libgcc, libstdc++, CA certificates, uid 65532; no shell
# The stand-ins also trust this machine's extra CA certificates (/usr/local/share/ca-certificates), so that
# cargo and pip inside the build reach crates.io and PyPI through a TLS-inspecting egress proxy. The Dockerfile
# itself is unchanged and builds as-is against a real registry.
#
# Settings (environment): IMAGE (tag to build, default localhost/fmnist-serve:dev), STANDIN_DIR (work folder
# for the stand-ins, default /var/tmp/fmnist-standins), PULL_BASE=1 (pull missing base images instead of
# building stand-ins), KEEP=1 (leave the container running after the checks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-localhost/fmnist-serve:dev}
STANDIN_DIR=${STANDIN_DIR:-/var/tmp/fmnist-standins}
GRPCURL=${GRPCURL:-$ROOT/.venv-tools/bin/grpcurl}
RUST_VERSION=$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile)
RUST_IMAGE=docker.io/library/rust:${RUST_VERSION}-slim-bookworm
PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
BOOKWORM=localhost/fmnist-standin/bookworm:latest
PODMAN=(podman --runtime runc)

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }
STEP_START=0
step() { STEP_START=$SECONDS; echo "== $*"; }
done_step() { echo "   ($((SECONDS - STEP_START)) s)"; }
T0=$SECONDS

# The stand-in names must be the ones the Dockerfile uses, or podman would look elsewhere.
for from in "rust:\${RUST_VERSION}-slim-bookworm" "$PYTHON_IMAGE" "$RUNTIME_IMAGE"; do
  grep -qF "$from" Dockerfile || fail "Dockerfile no longer names $from: update this script's base images"
done

step "host tools: podman, runc, debootstrap, grpcurl"
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# No systemd here and no ulimit to raise: cgroupfs and no default ulimits, or containers fail to start.
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<'EOF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
EOF
fi
[ -x "$GRPCURL" ] || make -s tools
podman --version
done_step

image_exists() { podman image exists "$1"; }

# A minimal bookworm root filesystem, imported once; the stand-ins are built on it.
bookworm_rootfs() {
  image_exists "$BOOKWORM" && return 0
  local rootfs=$STANDIN_DIR/rootfs
  if [ ! -f "$rootfs/.complete" ]; then
    rm -rf "$rootfs"
    mkdir -p "$STANDIN_DIR"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" http://deb.debian.org/debian \
      >"$STANDIN_DIR/debootstrap.log" 2>&1 || { tail -20 "$STANDIN_DIR/debootstrap.log"; fail "debootstrap"; }
    cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    touch "$rootfs/.complete"
  fi
  tar -C "$rootfs" --exclude=./.complete -c . | podman import --quiet --change 'CMD ["bash"]' - "$BOOKWORM" >/dev/null
}

standin_rust() {
  local sysroot version
  sysroot=$(rustc --print sysroot)
  version=$(rustc --version | awk '{print $2}')
  [[ $version == "$RUST_VERSION".* ]] || fail "this machine's rustc is $version; the Dockerfile wants $RUST_VERSION"
  mkdir -p "$STANDIN_DIR/rust"
  cat >"$STANDIN_DIR/rust/Containerfile" <<EOF
FROM $BOOKWORM
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo RUST_VERSION=$version \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN dest=/usr/local/rustup/toolchains/$version-x86_64-unknown-linux-gnu \\
    && mkdir -p \$dest /usr/local/cargo/bin \\
    && cp -a /mnt/toolchain/bin /mnt/toolchain/lib /mnt/toolchain/libexec /mnt/toolchain/etc \$dest/ \\
    && for t in cargo rustc rustdoc; do ln -s \$dest/bin/\$t /usr/local/cargo/bin/\$t; done \\
    && cargo --version && rustc --version
EOF
  "${PODMAN[@]}" build --quiet --pull=never -v "$sysroot:/mnt/toolchain:ro" -t "$RUST_IMAGE" "$STANDIN_DIR/rust" \
    >"$STANDIN_DIR/rust.log" 2>&1 || { tail -20 "$STANDIN_DIR/rust.log"; fail "stand-in $RUST_IMAGE"; }
}

standin_python() {
  mkdir -p "$STANDIN_DIR/python"
  cat >"$STANDIN_DIR/python/Containerfile" <<EOF
FROM $BOOKWORM
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip --version
EOF
  "${PODMAN[@]}" build --quiet --pull=never -t "$PYTHON_IMAGE" "$STANDIN_DIR/python" \
    >"$STANDIN_DIR/python.log" 2>&1 || { tail -20 "$STANDIN_DIR/python.log"; fail "stand-in $PYTHON_IMAGE"; }
}

standin_distroless() {
  mkdir -p "$STANDIN_DIR/distroless"
  cat >"$STANDIN_DIR/distroless/Containerfile" <<EOF
FROM $BOOKWORM AS src
RUN apt-get update && apt-get install -y --no-install-recommends libstdc++6 libgomp1 libssl3 && rm -rf /var/lib/apt/lists/*
# The files of the same packages distroless cc ships, without docs; users root, nobody and nonroot (65532).
# Merged /usr like the rootfs, so that /lib/... and /usr/lib/... paths land in the same place.
RUN set -e; mkdir -p /out/etc/ssl/certs /out/tmp /out/home/nonroot /out/usr/lib /out/usr/lib64 /out/usr/bin; \\
    ln -s usr/lib /out/lib; ln -s usr/lib64 /out/lib64; ln -s usr/bin /out/bin; \\
    for pkg in libc6 libgcc-s1 libstdc++6 libgomp1 libssl3; do \\
      dpkg -L \$pkg | while read -r f; do \\
        case \$f in /usr/share/*) continue ;; esac; \\
        if [ ! -d "\$f" ]; then cp -a --parents "\$f" /out; fi; \\
      done; \\
    done; \\
    cp -a /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/; \\
    cp -a /etc/os-release /etc/ld.so.cache /out/etc/; \\
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >/out/etc/passwd; \\
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >/out/etc/group; \\
    chmod 1777 /out/tmp; chown 65532:65532 /out/home/nonroot
FROM scratch
COPY --from=src /out/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532
WORKDIR /home/nonroot
EOF
  "${PODMAN[@]}" build --quiet --pull=never -t "$RUNTIME_IMAGE" "$STANDIN_DIR/distroless" \
    >"$STANDIN_DIR/distroless.log" 2>&1 || { tail -20 "$STANDIN_DIR/distroless.log"; fail "stand-in $RUNTIME_IMAGE"; }
}

step "base images: $RUST_IMAGE, $PYTHON_IMAGE, $RUNTIME_IMAGE"
for pair in "$RUST_IMAGE:standin_rust" "$PYTHON_IMAGE:standin_python" "$RUNTIME_IMAGE:standin_distroless"; do
  base=${pair%:*} make_it=${pair##*:}
  if image_exists "$base"; then
    echo "   present: $base"
  elif [ "${PULL_BASE:-0}" = 1 ]; then
    podman pull --quiet "$base" >/dev/null
    echo "   pulled: $base"
  else
    t=$SECONDS
    bookworm_rootfs
    $make_it
    echo "   built stand-in: $base ($((SECONDS - t)) s)"
  fi
done
done_step

step "build $IMAGE"
# cargo's per-crate lines are left out; awk always succeeds, so pipefail reports podman's own status.
"${PODMAN[@]}" build --layers -t "$IMAGE" . 2>&1 \
  | awk '!/^ +(Compiling|Downloaded|Downloading) /{print "   | " $0; fflush()}' || fail "image build failed"
done_step

step "image size"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "   $IMAGE: $((size / 1000000)) MB ($size bytes)"
podman history --format '   {{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-140 | head -12
done_step

# Run as Kubernetes will, from the manifests themselves: the rendered base and model-volume overlay under
# `podman kube play`, checked through the published ports (scripts/kube-play-check.sh). The arguments,
# environment, security context and limits are the manifests', not a second list here.
step "run the rendered manifests with podman kube play"
IMAGE=$IMAGE bash scripts/kube-play-check.sh
done_step

echo "container check: all checks passed in $((SECONDS - T0)) s"
