"""Input drift, end to end (issue #38): a real server, real test-set images, the shipped alert rules, promtool.

1. Replays the Fashion-MNIST test set (all 10,000 images when Debian's dataset-fashion-mnist is installed, else
   the 1,000 of tests/fixtures) through a real server serving cnn, then two mixed streams: the test set with
   one image in five replaced by a drawn non-garment (shapes and scribbles made here, never used to fit
   anything), and the test set with one image in three inverted (dark garment on white). It reads the drift
   metrics after each stream.
2. Turns each stream's metric increments into promtool series at the stream's own rates (30 minutes of the
   test set, then 30 minutes of a mixed stream) and runs `promtool test rules` against
   deploy/monitoring/alerts.rules.yml: no drift alert may fire during the test set; the named alerts must fire
   25 minutes after the mix begins.
3. With the capture on (every rejected image, 1 MiB on disk), checks the capture: bounded, rotated, lines
   training/captures.py reads.

Usage: python3 tests/drift.py PROMTOOL_PATH (tests/drift.sh runs it). Standard library only.
"""
from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))
from serve_replay import classify, delta, scrape, select, server, signals  # noqa: E402

MODEL = "cnn"
DATASET = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
DRIFT_ALERTS = ["FmnistOutOfDistributionShareHigh", "FmnistLowConfidenceShareHigh", "FmnistClassMixShifted",
                "FmnistConfidenceDropped", "FmnistInputBrightnessShifted"]
# What each mixed stream must at least set off, stated before the first run (docs/drift.md "What fires"); the
# test prints every alert that fires.
EXPECTED = {
    "non-garments": ["FmnistOutOfDistributionShareHigh"],
    "inverted": ["FmnistInputBrightnessShifted"],
}
CAPTURE_MB = 1


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def test_images() -> tuple[list[bytes], str]:
    if DATASET.exists():
        raw = gzip.decompress(DATASET.read_bytes())[16:]
        return [raw[i:i + 784] for i in range(0, len(raw), 784)], "the 10,000 test-set images"
    raw = (REPO / "tests/fixtures/test-images.u8").read_bytes()
    return [raw[i:i + 784] for i in range(0, len(raw), 784)], "the 1,000 test-set images of tests/fixtures"


def drawn_non_garment(rng: random.Random) -> bytes:
    """A light drawing on black: filled discs, rings, triangles, or a scribble of strokes."""
    img = bytearray(784)
    kind = rng.choice(["disc", "ring", "triangle", "scribble"])
    cx, cy, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 11)
    level = rng.randint(150, 255)
    if kind == "scribble":
        x, y = rng.uniform(4, 24), rng.uniform(4, 24)
        for _ in range(rng.randint(3, 7)):
            nx, ny = rng.uniform(3, 25), rng.uniform(3, 25)
            for t in range(40):
                px, py = x + (nx - x) * t / 39, y + (ny - y) * t / 39
                for dx in (0, 1):
                    for dy in (0, 1):
                        xi, yi = int(px) + dx, int(py) + dy
                        if 0 <= xi < 28 and 0 <= yi < 28:
                            img[yi * 28 + xi] = level
            x, y = nx, ny
        return bytes(img)
    a = [(rng.uniform(2, 26), rng.uniform(2, 26)) for _ in range(3)]
    for yi in range(28):
        for xi in range(28):
            d = ((xi - cx) ** 2 + (yi - cy) ** 2) ** 0.5
            if kind == "disc":
                inside = d <= r
            elif kind == "ring":
                inside = r - 2.5 <= d <= r
            else:
                (x1, y1), (x2, y2), (x3, y3) = a
                s1 = (xi - x2) * (y1 - y2) - (x1 - x2) * (yi - y2)
                s2 = (xi - x3) * (y2 - y3) - (x2 - x3) * (yi - y3)
                s3 = (xi - x1) * (y3 - y1) - (x3 - x1) * (yi - y1)
                inside = (s1 >= 0 and s2 >= 0 and s3 >= 0) or (s1 <= 0 and s2 <= 0 and s3 <= 0)
            if inside:
                img[yi * 28 + xi] = level
    return bytes(img)


def promtool_series(phases: list[dict], reference: dict, minutes: int = 30) -> list[dict]:
    """input_series: each phase's increments spread evenly over `minutes`, one after the other, as counters;
    the reference gauges constant."""
    keys = sorted({k for d in phases for k in d if k[0].endswith(("_total", "_sum", "_count"))})
    series = []
    for name, labels in keys:
        value, parts = 0.0, []
        for i, d in enumerate(phases):
            step = d.get((name, labels), 0.0) / minutes
            start = value if i == 0 else value + step
            count = minutes if i == 0 else minutes - 1
            parts.append(f"{start:.6g}+{step:.6g}x{count}")
            value = start + step * count
        series.append({"series": selector(name, labels), "values": " ".join(parts)})
    total = minutes * len(phases)
    for (name, labels), v in sorted(reference.items()):
        series.append({"series": selector(name, labels), "values": f"{v:.6g}+0x{total}"})
    return series


def promtool_run(promtool: str, tests: list[dict]) -> tuple[bool, str]:
    """Runs `promtool test rules` on `tests` against the shipped rules; (passed, output)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "drift.test.yml"
        rules = REPO / "deploy/monitoring/alerts.rules.yml"
        spec.write_text(json.dumps({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
        run = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True)
        return run.returncode == 0, run.stdout + run.stderr


def promtool_passes(promtool: str, tests: list[dict]) -> bool:
    return promtool_run(promtool, tests)[0]


def selector(name: str, labels: tuple) -> str:
    ls = dict(labels, job="fmnist", instance="10.0.0.7:9090")
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(ls.items()))
    return f"{name}{{{inner}}}"


def main() -> int:
    promtool = sys.argv[1] if len(sys.argv) > 1 else "promtool"
    images, described = test_images()
    rng = random.Random(38)
    drawn = [drawn_non_garment(rng) for _ in range(len(images) // 4)]
    streams = {
        "test set": images,
        # One image in five is a drawn non-garment.
        "non-garments": [drawn[i // 5] if i % 5 == 4 and i // 5 < len(drawn) else img for i, img in enumerate(images)],
        # One image in three is inverted: a dark garment on white.
        "inverted": [bytes(255 - v for v in img) if i % 3 == 0 else img for i, img in enumerate(images)],
    }
    newest = max((d for d in (REPO / "models/cnn").iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    meta = json.loads((newest / "model.json").read_text())
    classes = [c["name"] for c in meta["classes"]]
    deltas, moved = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        capture_dir = Path(tmp) / "capture"
        extra = ["--capture-dir", str(capture_dir), "--capture-sample", "1", "--capture-max-mb", str(CAPTURE_MB)]
        with server(REPO / "models", [MODEL], extra) as (base, metrics_url, _):
            before = scrape(metrics_url)
            version = next(dict(k)["version"] for k in select(before, "fmnist_drift_reference", model=MODEL))
            reference = {k: v for k, v in before.items() if k[0].startswith("fmnist_drift_reference")
                         and dict(k[1]).get("model") == MODEL}
            for name, stream in streams.items():
                classify(base, MODEL, stream)
                after = scrape(metrics_url)
                deltas[name] = {k: v for k, v in delta(after, before).items()
                                if dict(k[1]).get("model") == MODEL and k[0] in (
                                    "fmnist_images_total", "fmnist_predicted_class_total",
                                    "fmnist_top_probability_sum", "fmnist_top_probability_count",
                                    "fmnist_input_brightness_sum", "fmnist_input_brightness_count")}
                moved[name] = signals(delta(after, before), MODEL, version, classes)
                before = after
            records = select(after, "fmnist_capture_records_total")
        captured = check_capture(capture_dir, records)

    ref_s = {dict(k[1]).get("signal"): v for k, v in reference.items() if k[0] == "fmnist_drift_reference"}
    ref_classes = {dict(k[1])["class"]: v for k, v in reference.items() if k[0] == "fmnist_drift_reference_class_share"}
    for name, s in moved.items():
        share = s["reasons"].get("out_of_distribution", 0), s["reasons"].get("low_confidence", 0)
        psi = sum((p - ref_classes[c]) * math.log(p / ref_classes[c]) for c, p in zip(classes, s["classes"]))
        print(f"# {name}: {s['images']} images: out_of_distribution {share[0]:.3f}, low_confidence {share[1]:.3f}, "
              f"class-mix PSI {psi:.3f}, top probability {s['top_probability_mean']:.3f}, "
              f"brightness {s['brightness_mean']:.3f}")
    if abs(moved["test set"]["brightness_mean"] - ref_s["brightness_mean"]) > 0.02:
        fail("the test set's brightness is not the validation split's: the reference is not of this data")
    if moved["non-garments"]["reasons"]["out_of_distribution"] <= moved["test set"]["reasons"]["out_of_distribution"]:
        fail("drawn non-garments did not move the out-of-distribution share")
    if moved["inverted"]["brightness_mean"] <= moved["test set"]["brightness_mean"] + 0.1:
        fail("inverted images did not move the brightness")
    print("ok - the drift metrics move: non-garments raise the out-of-distribution share, inverted images the brightness")

    quiet_tests, fired = [], {}
    for mixed in EXPECTED:
        series = promtool_series([deltas["test set"], deltas[mixed]], reference)
        # 29 minutes of the test set: no drift alert fires.
        quiet_tests.append({"name": f"the test set before {mixed}", "interval": "1m", "input_series": series,
                            "alert_rule_test": [{"eval_time": "29m", "alertname": a, "exp_alerts": []}
                                                for a in DRIFT_ALERTS]})
        # 25 minutes into the mixed stream: which alerts fire (one promtool run per alert, so that every one is
        # known, not only the first mismatch).
        fired[mixed] = [a for a in DRIFT_ALERTS if promtool_passes(promtool, [{
            "name": f"{a} fires on {mixed}", "interval": "1m", "input_series": series,
            "promql_expr_test": [{"eval_time": "55m",
                                  "expr": f'count(ALERTS{{alertname="{a}",alertstate="firing",model="{MODEL}",version="{version}"}})',
                                  "exp_samples": [{"labels": "{}", "value": 1}]}]}])]
    ok, output = promtool_run(promtool, quiet_tests)
    if not ok:
        fail(f"a drift alert fired during the test set:\n{output}")
    print(f"ok - promtool: {described} keep every drift alert quiet for 29 minutes")
    for mixed, expected in EXPECTED.items():
        missing = [a for a in expected if a not in fired[mixed]]
        if missing:
            fail(f"25 minutes into the {mixed} stream, {missing} did not fire (fired: {fired[mixed]})")
        print(f"ok - promtool: 25 minutes into the {mixed} stream {fired[mixed]} fire (required: {expected})")
    print(f"ok - capture: {captured}")
    return 0


def check_capture(capture_dir: Path, records: dict) -> str:
    outcomes = {dict(k)["outcome"]: v for k, v in records.items()}
    segments = sorted(capture_dir.glob("capture-*.jsonl"))
    size = sum(p.stat().st_size for p in segments)
    if not segments:
        fail("the capture wrote nothing")
    if size > CAPTURE_MB << 20:
        fail(f"the capture holds {size} bytes, over its {CAPTURE_MB} MiB bound")
    if outcomes.get("written", 0) * 1300 < CAPTURE_MB << 20:
        fail(f"too few records written to test rotation: {outcomes}")
    lines = [json.loads(line) for p in segments for line in p.read_text().splitlines()]
    if {line["reason"] for line in lines} - {"out_of_distribution", "low_confidence"}:
        fail("the capture kept images the model did not reject")
    from captures import read_captures  # noqa: E402  (training/ is on the path, above)
    for line in lines[:50]:
        line["label"] = "not_garment" if line["reason"] == "out_of_distribution" else "Shirt"
    labelled = capture_dir.parent / "labelled"
    labelled.mkdir()
    (labelled / "capture-0000000000000-000000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = read_captures(labelled)
    if len(got.images) != 50 or any(len(i) != 784 for i in got.images):
        fail(f"training/captures.py read {len(got.images)} labelled images, expected 50")
    return (f"{outcomes.get('written', 0):.0f} records written, {len(segments)} segments kept ({size} bytes, bound "
            f"{CAPTURE_MB} MiB), {outcomes.get('dropped_queue_full', 0):.0f} dropped with the writer behind; "
            f"training/captures.py reads the 50 labelled of {len(lines)}")


if __name__ == "__main__":
    sys.exit(main())
