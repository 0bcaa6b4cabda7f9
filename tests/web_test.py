"""The browser page in headless Chromium against a real server (tests/web.sh starts it and sets GRPC_ADDR).

Uploads real test-set PNGs and a blank image through the page's file input and drop zone, and checks what a user
sees: the class, accepted/rejected with the reason, the probability bars, the class description from
GetModelInfo, and the 28x28 model input. Set SCREENSHOT=path to save a screenshot of an accepted result.
"""

import json
import os
import struct
import tempfile
import unittest
import zlib
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parent.parent
PNG_DIR = REPO / "tests" / "fixtures" / "png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def grayscale_png(pixels: bytes, width: int, height: int) -> bytes:
    """A minimal 8-bit grayscale PNG, so the test needs no imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class BrowserPage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.url = f"http://{os.environ['GRPC_ADDR']}/"
        cls.tmp = tempfile.TemporaryDirectory()
        cls.blank = Path(cls.tmp.name) / "blank.png"
        cls.blank.write_bytes(grayscale_png(bytes(28 * 28), 28, 28))
        cls.playwright = sync_playwright().start()
        cls.browser = cls.playwright.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                                     args=CHROMIUM_ARGS)

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.playwright.stop()
        cls.tmp.cleanup()

    def setUp(self):
        self.page = self.browser.new_page(viewport={"width": 1000, "height": 900})
        self.errors = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)
        # The page marks itself ready once GetModelInfo has answered (or failed).
        expect(self.page.locator("body")).to_have_attribute("data-ready", "true")

    def tearDown(self):
        self.page.close()
        self.assertEqual(self.errors, [], "the page logged errors")
        foreign = [u for u in self.requests if not u.startswith(self.url) and not u.startswith(("data:", "blob:"))]
        self.assertEqual(foreign, [], "the page fetched from another origin")

    def upload(self, path: Path):
        self.page.set_input_files("#file", str(path))

    def default_model(self) -> str:
        option = self.page.locator("#model option", has_text="(default)")
        return option.get_attribute("value")

    def test_model_info_fills_the_model_choice(self):
        model = self.default_model()
        self.assertTrue((REPO / "models" / model / "1" / "model.json").exists(), model)
        expect(self.page.locator("#server")).to_contain_text("test accuracy")

    def test_a_test_set_ankle_boot_is_classified_and_accepted_with_its_description(self):
        self.upload(PNG_DIR / "ankle-boot-0.png")
        expect(self.page.locator("#class")).to_have_text("Ankle boot")
        expect(self.page.locator("#status")).to_have_text("accepted")
        expect(self.page.locator("#result")).to_have_attribute("data-reason", "REASON_ACCEPTED")

        bars = self.page.locator("#bars li")
        expect(bars).to_have_count(10)
        expect(self.page.locator("#bars li.top")).to_contain_text("Ankle boot")
        shown = [float(v.rstrip("%")) for v in self.page.locator("#bars .value").all_text_contents()]
        self.assertAlmostEqual(sum(shown), 100.0, delta=0.6)
        self.assertEqual(max(shown), shown[9])

        model = self.page.locator("#answered-by").text_content().split()[1]
        meta = json.loads((REPO / "models" / model / "1" / "model.json").read_text())
        expect(self.page.locator("#description")).to_have_text(meta["classes"][9]["description"])

        # The fixture is already a 28x28 test-set image on a dark background, so the model sees it unchanged.
        same = self.page.evaluate("""async () => {
            const img = document.getElementById('original');
            await img.decode();
            const c = document.createElement('canvas'); c.width = 28; c.height = 28;
            const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
            const want = ctx.getImageData(0, 0, 28, 28).data;
            const got = document.getElementById('model-input').getContext('2d').getImageData(0, 0, 28, 28).data;
            let diff = 0, lit = 0;
            for (let i = 0; i < got.length; i += 4) { diff = Math.max(diff, Math.abs(got[i] - want[i])); lit += got[i] > 0; }
            return { diff, lit };
        }""")
        self.assertLessEqual(same["diff"], 1, same)
        self.assertGreater(same["lit"], 100, same)

        if os.environ.get("SCREENSHOT"):
            self.page.screenshot(path=os.environ["SCREENSHOT"], full_page=True)

    def test_the_class_mix_is_shown_beside_the_validation_reference(self):
        self.upload(PNG_DIR / "ankle-boot-0.png")
        expect(self.page.locator("#class")).to_have_text("Ankle boot")
        expect(self.page.locator("#drift")).to_be_visible()
        rows = self.page.locator("#drift-table tbody tr")
        expect(rows).to_have_count(10)
        model, version = self.page.locator("#answered-by").text_content().split()[1:3]
        reference = json.loads((REPO / "models" / model / version / "model.json").read_text())["drift_reference"]
        # After the page's own call the mix has an ankle boot (the panel is refreshed after each answer).
        here = rows.nth(9).locator("td").nth(1)
        expect(here).not_to_have_text("0.0%")
        expect(rows.nth(9).locator("td").nth(2)).to_have_text(f"{100 * reference['classes'][9]:.1f}%")
        expect(self.page.locator("#drift-summary")).to_contain_text(f"{reference['images']} validation images")

    def test_a_dropped_trouser_is_classified_and_accepted(self):
        data = list((PNG_DIR / "trouser-2.png").read_bytes())
        self.page.evaluate("""(bytes) => {
            const file = new File([new Uint8Array(bytes)], 'trouser-2.png', { type: 'image/png' });
            const dt = new DataTransfer(); dt.items.add(file);
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true }));
        }""", data)
        expect(self.page.locator("#class")).to_have_text("Trouser")
        expect(self.page.locator("#status")).to_have_text("accepted")

    def test_a_blank_image_is_rejected_as_low_contrast(self):
        self.upload(PNG_DIR / "ankle-boot-0.png")
        expect(self.page.locator("#status")).to_have_text("accepted")
        self.upload(self.blank)
        expect(self.page.locator("#status")).to_have_text("rejected")
        expect(self.page.locator("#status")).to_have_class("status rejected")
        expect(self.page.locator("#reason")).to_have_text("low contrast")
        expect(self.page.locator("#result")).to_have_attribute("data-reason", "REASON_LOW_CONTRAST")
        expect(self.page.locator("#detail")).to_contain_text("minimum contrast")
        expect(self.page.locator("#class")).to_have_text("no prediction")
        expect(self.page.locator("#bars li")).to_have_count(0)
        expect(self.page.locator("#info")).to_be_hidden()

    def test_an_invalid_threshold_shows_the_servers_invalid_argument(self):
        self.page.fill("#min-confidence", "2")
        self.upload(PNG_DIR / "trouser-2.png")
        expect(self.page.locator("#error")).to_be_visible()
        expect(self.page.locator("#error")).to_contain_text("INVALID_ARGUMENT")
        expect(self.page.locator("#result")).to_be_hidden()


if __name__ == "__main__":
    unittest.main(verbosity=2)
