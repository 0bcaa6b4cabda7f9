"""The garment head's exposure set (issue #30): clip-art and desktop icons from Debian packages, rendered the ways
a user's upload of such a picture reaches the service, grouped by kind for leave-one-group-out evaluation.

Sources (all offline Debian packages; `apt-get install openclipart-png adwaita-icon-theme breeze-icon-theme
papirus-icon-theme librsvg2-bin`):
  openclipart-png   ~8,100 clip-art PNGs under /usr/share/openclipart/png/<category>/..., grouped by category
  Adwaita, breeze,  icons (PNG, or SVG rendered with rsvg-convert), one file per icon name and theme (the largest
  Papirus           size), grouped into icons-apps (application icons), icons-glyphs (monochrome symbolic
                    icons: actions, status, ...), icons-files (folders, file types, devices)

What is left out, and by which rule (every exclusion is listed in build/ood-head/png/excluded.tsv):
  garment     anything under people/clothing/, and any file whose name has a garment word (GARMENT_TOKENS as a
              whole word, or GARMENT_STEMS anywhere in the lower-cased name; English, Italian, French, German
              and Spanish, since openclipart's file names are in all five): shoes, boots, bags, hats, shirts,
              dresses, coats, luggage, ...  A garment rendered as an outlier would teach the head to reject
              the very things it must accept.
  reserved    names of natural-material textures (marble, brick, wood, weave, stone, texture, ...): the issue
              reserves procedural drawings of natural materials for an independent check, so nothing that
              looks like them is trained on; likewise smileys (people/smilies/) and icon emotes/emoji/face-*
              icons, the nearest thing to the reserved emoji fonts.
  duplicate   a file whose bytes equal an earlier one's (openclipart lists some pictures in two categories:
              the first in sorted path order is kept, so no picture is in two groups).

Renderings (each source gives VARIANTS_PER_SOURCE of these, drawn at random, each at its own scale: the object
fills 35-100% of a canvas of 48-224 pixels, at a random place):
  grey-black   the picture's grey levels composited on black (a cut-out on a dark background)
  grey-white   composited on white (the service's polarity step inverts it)
  silhouette   the alpha mask filled (light on black, or dark on white), a segmentation mask
  outline      the alpha mask's edge, 1-3 pixels wide, light on black or dark on white (a line drawing)
Then training/ood_head_data.py --preprocess runs the service's own preprocessing
(target/release/examples/preprocess, built by `make ood-sets`) over each group: build/ood-head/<group>.u8.

    .venv-train/bin/python training/ood_head_data.py --out build/ood-head   # PNGs, manifest, exclusions, .u8
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
CLIPART = Path("/usr/share/openclipart/png")
ICONS = Path("/usr/share/icons")
VARIANTS_PER_SOURCE = 3
MODES = ["grey-black", "grey-white", "silhouette", "outline"]

GARMENT_TOKENS = {
    # English
    "shirt", "shirts", "tshirt", "dress", "dresses", "shoe", "shoes", "boot", "boots", "sandal", "sandals",
    "sneaker", "sneakers", "bag", "bags", "purse", "hat", "hats", "cap", "caps", "coat", "coats", "jacket",
    "trouser", "trousers", "pants", "jeans", "shorts", "skirt", "sock", "socks", "glove", "gloves", "mitten",
    "scarf", "sweater", "pullover", "hoodie", "heel", "heels", "slipper", "slippers", "thongs", "tie", "ties",
    "robe", "gown", "costume", "belt", "bikini", "uniform", "hanger", "wear", "tote", "wallet", "blouse", "vest",
    "apparel", "garment", "clothes", "clothing", "cloth", "fedora", "sombrero", "turban", "tophat", "beret",
    "bonnet", "kimono", "sari", "tuxedo", "suit", "swimsuit", "lingerie", "bra", "underwear", "pyjama", "pajama",
    "raincoat", "overcoat", "cardigan", "jumper", "poncho", "apron", "helmet", "backpacker", "knapsack",
    "rucksack", "satchel", "pouch", "clog", "moccasin", "loafer", "trainers", "flipflop", "pantyhose", "stocking",
    "stockings", "tights", "leggings",
    # Italian, French, German, Spanish (openclipart's names)
    "borsa", "borse", "gonna", "sac", "robe", "botte", "bottes", "veste", "jupe", "manteau", "hemd", "kleid",
    "tasche", "hut", "hose", "schuh", "schuhe", "jacke", "mantel", "camisa", "bolso", "falda", "abrigo",
}
GARMENT_STEMS = [
    "shirt", "sneaker", "sandal", "trouser", "skirt", "jacket", "sweater", "pullover", "backpack", "luggage",
    "baggage", "suitcase", "handbag", "purse", "slipper", "clothing", "clothes", "fashion", "pantyhose", "tophat",
    "vestit", "vestid", "cappell", "giacc", "camici", "magliett", "stival", "valig", "scarp", "zaino", "cravatt",
    "attaccapann", "pantalon", "ciabatt", "pattino", "chaussur", "chapeau", "chemise", "kleid", "stiefel",
    "zapato", "sombrero", "fedora",
]
RESERVED_TOKENS = {"marble", "brick", "bricks", "wood", "weave", "woven", "texture", "textures", "voronoi",
                   "granite", "stone", "stones", "emoji", "emote", "emotes", "smiley", "smilies"}
RESERVED_STEMS = ["texture", "legno", "marmo", "mattone", "emoji", "emoticon", "smiley", "smilie"]
RESERVED_DIRS = ["people/smilies"]
GARMENT_DIRS = ["people/clothing"]

# openclipart category (path prefix, longest first wins) -> group. Kinds that a round-2 evaluation group already
# covers join that group's leave-one-group-out fold (training/ood_head.py: FOLD_LINKS), never its measurement.
CLIPART_GROUPS = {
    "animals": "animals", "food": "food", "plants": "plants",
    "transportation": "vehicles", "transportation/roadsigns": "symbols", "transportation/aiga-symbols": "symbols",
    "tools": "tools", "tools/toys": "recreation", "recreation": "recreation",
    "buildings": "places", "geography": "places", "buildings/furniture": "household", "containers": "household",
    "office": "household", "electronics": "household", "education": "household", "science": "household",
    "computer": "computer", "people": "people",
    "signs_and_symbols": "symbols", "logos": "symbols", "buttons": "symbols",
    "shapes": "clip-shapes", "special/patterns": "clip-patterns", "special/gradients": "clip-patterns",
    "decorations": "clip-patterns", "special": "misc", "unsorted": "misc",
}
SKIP_DIRS = ["unsorted/duplicates"]


def tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-z]+", name.lower()) if t]


def exclusion(rel: str) -> str | None:
    """Why a source file is left out ('garment: ...', 'reserved: ...'), or None."""
    low = rel.lower()
    name = low.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    toks = set(tokens(name))
    for d in GARMENT_DIRS:
        if low.startswith(d + "/"):
            return f"garment: under {d}/"
    hit = sorted(toks & GARMENT_TOKENS) or [s for s in GARMENT_STEMS if s in name]
    if hit:
        return f"garment: name has {hit[0]!r}"
    for d in RESERVED_DIRS:
        if low.startswith(d + "/"):
            return f"reserved: under {d}/"
    hit = sorted(toks & RESERVED_TOKENS) or [s for s in RESERVED_STEMS if s in name]
    if hit:
        return f"reserved: name has {hit[0]!r}"
    if "/emotes/" in "/" + low or name.startswith("face-"):
        return "reserved: emote icon"
    return None


def clipart_group(rel: str) -> str:
    best = max((k for k in CLIPART_GROUPS if rel == k or rel.startswith(k + "/")), key=len, default=None)
    return CLIPART_GROUPS[best] if best else "misc"


def clipart_sources() -> list[tuple[str, str, Path]]:
    """(group, id, path) for every clip-art PNG; the excluded ones with group 'excluded:<why>'."""
    out = []
    for p in sorted(CLIPART.rglob("*.png")):
        rel = str(p.relative_to(CLIPART))
        if any(rel.startswith(d + "/") for d in SKIP_DIRS):
            continue
        why = exclusion(rel)
        out.append((f"excluded:{why}" if why else clipart_group(rel), "oc-" + rel, p))
    return out


def icon_sources(rng: np.random.Generator) -> list[tuple[str, str, Path]]:
    """One file per (theme, icon name), the largest size; symlinks (aliases) skipped."""
    out = []

    def size_of(p: Path) -> int:
        for part in p.parts:
            m = re.match(r"^(\d+)(x\d+)?(@2x)?$", part)
            if m:
                return int(m.group(1)) * (2 if m.group(3) else 1)
        return 1000 if "scalable" in p.parts or "symbolic" in p.parts else 0

    def context_of(theme: str, p: Path) -> str:
        parts = p.relative_to(ICONS / theme).parts
        for c in ("apps", "actions", "status", "categories", "devices", "emblems", "emotes", "mimetypes", "places",
                  "preferences", "applets", "ui", "legacy", "animations"):
            if c in parts:
                return c
        return "other"

    for theme in ("Adwaita", "breeze", "Papirus"):
        best: dict[tuple[str, str], Path] = {}
        for p in sorted((ICONS / theme).rglob("*")):
            if p.is_symlink() or not p.is_file() or p.suffix not in (".png", ".svg") or "cursors" in p.parts:
                continue
            ctx = context_of(theme, p)
            name = p.name.split(".")[0]
            symbolic = "symbolic" in p.name or "symbolic" in p.parts or theme == "breeze" and ctx in (
                "actions", "status", "emblems", "preferences", "categories", "applets", "animations")
            key = (name, "glyph" if symbolic else ctx)
            if key not in best or size_of(p) > size_of(best[key]):
                best[key] = p
        for (name, kind), p in sorted(best.items()):
            ctx = context_of(theme, p)
            if kind == "glyph":
                group = "icons-glyphs"
            elif ctx in ("apps", "legacy", "applets", "preferences", "categories"):
                group = "icons-apps"
            elif ctx in ("places", "mimetypes", "devices"):
                group = "icons-files"
            else:
                group = "icons-glyphs"
            rel = f"{theme}/{p.relative_to(ICONS / theme)}"
            why = exclusion(f"{ctx}/{p.name}") if ctx != "emotes" else "reserved: emote icon"
            out.append((f"excluded:{why}" if why else group, "ic-" + rel, p))
    # Papirus alone has ~3,600 application icons and ~1,900 folder icons that differ mostly in colour: cap
    # each theme's share of a group so the groups stay varied and the rendering short.
    caps = {"icons-apps": 1200, "icons-files": 400, "icons-glyphs": 1500}
    capped = []
    for theme in ("Adwaita", "breeze", "Papirus"):
        for group, cap in caps.items():
            rows = [r for r in out if r[0] == group and r[1].startswith(f"ic-{theme}/")]
            if len(rows) > cap:
                keep = set(rng.choice(len(rows), cap, replace=False).tolist())
                rows = [r for i, r in enumerate(rows) if i in keep]
            capped += rows
    return capped + [r for r in out if r[0].startswith("excluded:")]


def load_rgba(path: Path, render_side: int = 192) -> Image.Image | None:
    if path.suffix == ".svg":
        with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
            r = subprocess.run(["rsvg-convert", "-w", str(render_side), "-h", str(render_side), "-a", "-o", tmp.name,
                                str(path)], capture_output=True, timeout=60)
            if r.returncode != 0:
                return None
            return Image.open(tmp.name).convert("RGBA")
    try:
        img = Image.open(path)
        img.load()
    except Exception:  # noqa: BLE001 - a broken source file is skipped and counted
        return None
    return img.convert("RGBA")


def grey_and_mask(img: Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """Grey levels (0-255) and an alpha (0-1) cropped to the object; for an opaque picture the mask is what
    differs from its border colour."""
    a = np.asarray(img, dtype=np.float64)
    grey = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    alpha = a[..., 3] / 255.0
    if alpha.min() > 0.98:
        border = np.median(np.r_[grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        alpha = np.clip(np.abs(grey - border) / 40.0, 0, 1)
    ys, xs = np.nonzero(alpha > 0.1)
    if len(ys) < 20:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return grey[y0:y1, x0:x1], alpha[y0:y1, x0:x1]


def render(grey: np.ndarray, alpha: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(48, 225))
    fill = rng.uniform(0.35, 1.0)
    h, w = grey.shape
    scale = fill * side / max(h, w)
    nh, nw = max(2, int(round(h * scale))), max(2, int(round(w * scale)))
    g = np.asarray(Image.fromarray(grey.astype(np.float32)).resize((nw, nh), Image.Resampling.BILINEAR))
    m = np.clip(np.asarray(Image.fromarray(alpha.astype(np.float32)).resize((nw, nh), Image.Resampling.BILINEAR)), 0, 1)
    dark_on_white = rng.random() < 0.5
    if mode == "grey-black":
        obj, bg = g * m, 0.0
        dark_on_white = False
    elif mode == "grey-white":
        obj, bg = g * m + 255 * (1 - m), 255.0
        dark_on_white = False
    else:
        mask = m > 0.5
        if mode == "outline":
            width = int(rng.integers(1, 4))
            pil = Image.fromarray(mask.astype(np.uint8) * 255)
            eroded = np.asarray(pil.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
            mask = mask & ~eroded
        level = rng.uniform(170, 255)
        obj = np.where(mask, level, 0.0)
        bg = 0.0
    canvas = np.full((side, side), bg)
    y, x = int(rng.integers(0, side - nh + 1)), int(rng.integers(0, side - nw + 1))
    canvas[y : y + nh, x : x + nw] = obj
    if mode in ("silhouette", "outline") and dark_on_white:
        canvas = 255 - canvas
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def render_source(job: tuple[str, str, str, int]) -> list[tuple[str, str, str]]:
    """Renders one source into its group folder; returns (group, file, mode) rows."""
    group, sid, path, seed = job
    rng = np.random.default_rng(seed)
    img = load_rgba(Path(path))
    if img is None:
        return []
    if max(img.size) > 400:  # huge clip-art: detail below 28x28 is lost anyway
        img.thumbnail((400, 400), Image.Resampling.LANCZOS)
    gm = grey_and_mask(img)
    if gm is None:
        return []
    stem = hashlib.sha1(sid.encode()).hexdigest()[:12]
    rows = []
    for k, mode in enumerate(rng.choice(MODES, VARIANTS_PER_SOURCE, replace=False)):
        a = render(*gm, str(mode), rng)
        name = f"{stem}-{k}-{mode}.png"
        Image.fromarray(a).save(OUT_PNG / group / name)
        rows.append((group, name, str(mode)))
    return rows


OUT_PNG = Path()


def init_worker(out_png: str) -> None:
    global OUT_PNG
    OUT_PNG = Path(out_png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "build/ood-head"))
    p.add_argument("--seed", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preprocess", default=str(REPO / "target/release/examples/preprocess"))
    p.add_argument("--skip-render", action="store_true", help="only run the preprocessing over existing PNGs")
    a = p.parse_args()
    out = Path(a.out)
    png = out / "png"
    rng = np.random.default_rng(a.seed)
    if not a.skip_render:
        if not CLIPART.is_dir() or not ICONS.is_dir() or shutil.which("rsvg-convert") is None:
            sys.exit("needs openclipart-png, the icon themes and librsvg2-bin: apt-get install openclipart-png "
                     "adwaita-icon-theme breeze-icon-theme papirus-icon-theme librsvg2-bin")
        sources = clipart_sources() + icon_sources(rng)
        seen: dict[str, str] = {}
        kept, excluded = [], []
        for group, sid, path in sources:
            if group.startswith("excluded:"):
                excluded.append((sid, group.split(":", 1)[1]))
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                excluded.append((sid, f"duplicate: same bytes as {seen[digest]}"))
                continue
            seen[digest] = sid
            kept.append((group, sid, path))
        if png.exists():
            shutil.rmtree(png)
        for g in sorted({g for g, _, _ in kept}):
            (png / g).mkdir(parents=True)
        seeds = rng.integers(0, 2**31, len(kept))
        jobs = [(g, sid, str(path), int(s)) for (g, sid, path), s in zip(kept, seeds)]
        manifest = []
        with ProcessPoolExecutor(a.workers, initializer=init_worker, initargs=(str(png),)) as ex:
            for (g, sid, path, _), rows in zip(jobs, ex.map(render_source, jobs, chunksize=32)):
                if not rows:
                    excluded.append((sid, "unreadable or empty"))
                manifest += [(gg, name, mode, sid) for gg, name, mode in rows]
        (png / "manifest.tsv").write_text("group\tfile\tmode\tsource\n" + "".join("\t".join(r) + "\n" for r in sorted(manifest)))
        (png / "excluded.tsv").write_text("source\twhy\n" + "".join(f"{s}\t{w}\n" for s, w in sorted(excluded)))
        counts: dict[str, int] = {}
        for g, *_ in manifest:
            counts[g] = counts.get(g, 0) + 1
        for g, n in sorted(counts.items()):
            print(f"{g}: {n} images from {sum(1 for k in kept if k[0] == g)} sources")
        reasons: dict[str, int] = {}
        for _, w in excluded:
            reasons[w.split(":")[0]] = reasons.get(w.split(":")[0], 0) + 1
        print("excluded:", reasons)
    if not Path(a.preprocess).exists():
        sys.exit(f"{a.preprocess} not found: run `make ood-sets` (it builds the preprocess example)")
    for d in sorted(x for x in png.iterdir() if x.is_dir()):
        subprocess.run([a.preprocess, str(d), str(out / d.name)], check=True)
        n = (out / f"{d.name}.u8").stat().st_size // 784
        print(f"{d.name}: {n} model inputs -> {out / d.name}.u8")


if __name__ == "__main__":
    main()
