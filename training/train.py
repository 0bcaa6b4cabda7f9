"""Train, select, export and evaluate the Fashion-MNIST models.

    python training/train.py --model cnn                # full run: writes models/cnn/<next version>/ (model.onnx, model.json, plots)
    python training/train.py --model dense --folds 5    # k-fold cross-validation estimate, test set untouched
    python training/train.py --model cnn --smoke --out-dir /tmp/x   # one short epoch on a subset

The CNN then gets a short outlier-exposure fine-tune against build/ood-exposure (training/ood_data.py --set
exposure, through the service's preprocessing; `make train` builds it), which makes its energy score separate
garments from everything else. --init-from models/cnn.pt runs only that stage on saved weights.

The test set is read once, after training, and only through the exported ONNX file (see export.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DEFAULT_DATA_DIR, DatasetError, load_split  # noqa: E402
from repository import new_version_dir  # noqa: E402
from models import ARCHITECTURES  # noqa: E402

# Defaults per architecture, chosen to fit `make train` (both models) in well under 90 minutes on 2 cores.
DEFAULTS = {
    "dense": dict(epochs=20, batch_size=256, lr=2e-3, weight_decay=1e-4, patience=8, augment=False, erase=0.0,
                  exposure_epochs=0),
    "cnn": dict(epochs=36, batch_size=128, lr=3e-3, weight_decay=5e-4, patience=8, augment=True, erase=0.5,
                exposure_epochs=3),
}
REPO = Path(__file__).resolve().parent.parent

# Energy-bounded outlier exposure (Liu et al., "Energy-based Out-of-distribution Detection", 2020): squared
# hinges keep the energy -logsumexp(logits) of training images below EXPOSURE_MARGINS[0] and that of outliers
# above EXPOSURE_MARGINS[1]. The margins sit either side of the unexposed CNN's energies: test images have a
# median of -8.0 and a 99th percentile of -2.7, the evaluation outliers a median of about -2.
EXPOSURE_MARGINS = (-6.0, -1.0)
EXPOSURE_WEIGHT = 0.1
EXPOSURE_LR = 5e-4


@dataclass
class Config:
    model: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    augment: bool
    erase: float
    exposure_epochs: int
    exposure_dir: str
    init_from: str
    val_size: int
    seed: int
    threads: int
    smoke: bool
    folds: int
    data_dir: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28] in [0,1]: exactly the input the exported model expects."""
    return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator, erase_p: float = 0.0) -> torch.Tensor:
    """Random horizontal flip, a random shift of up to 2 pixels (zero padding = dataset background) and, with
    probability `erase_p`, random erasing: one rectangle of 2-25 % of the image set to background."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
    if erase_p > 0:
        area = (0.02 + 0.23 * torch.rand(n, generator=gen)) * 28 * 28
        aspect = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(3.0))
        h = (area * aspect).sqrt().round().clamp(1, 28)
        w = (area / aspect).sqrt().round().clamp(1, 28)
        top = (torch.rand(n, generator=gen) * (29 - h)).floor()
        left = (torch.rand(n, generator=gen) * (29 - w)).floor()
        rows = torch.arange(28).view(1, 28, 1)
        cols = torch.arange(28).view(1, 1, 28)
        box = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1))
               & (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)))
        erase = (torch.rand(n, generator=gen) < erase_p).view(n, 1, 1) & box
        out = out.masked_fill(erase.unsqueeze(1), 0.0)
    return out


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits, _ = model(x[i : i + batch_size])
            loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    return loss / len(x), correct / len(x)


def train_epoch(model: torch.nn.Module, opt, sched, x_train, batch_size: int, gen: torch.Generator, desc: str,
                batch_loss) -> tuple[float, float]:
    """One pass over the training images in a random order, one optimiser step per batch. `batch_loss(idx)`
    returns the loss to minimise, the cross-entropy, logits and labels of the batch's training images, and extra
    progress-bar fields. Returns the epoch's mean cross-entropy and accuracy on the training images."""
    perm = torch.randperm(len(x_train), generator=gen)
    seen, loss_sum, correct = 0, 0.0, 0
    bar = tqdm(range(math.ceil(len(x_train) / batch_size)), desc=desc, leave=False, mininterval=2.0, file=sys.stderr)
    for step in bar:
        idx = perm[step * batch_size : (step + 1) * batch_size]
        loss, ce, logits, yb, extra = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(idx)
        loss_sum += ce.item() * len(idx)
        correct += (logits.argmax(1) == yb).sum().item()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", **extra, refresh=False)
    bar.close()
    return loss_sum / seen, correct / seen


def fit(cfg: Config, x_train, y_train, x_val, y_val, label: str = "",
        checkpoint: Path | None = None) -> tuple[torch.nn.Module, list[dict], dict]:
    """Trains with AdamW + one-cycle LR, keeps the weights with the lowest validation loss (the reference's
    checkpoint callback) and stops early after `patience` epochs without improvement.

    With `checkpoint`, the whole state (weights, optimizer, schedule, every random generator, history and best
    weights) is saved there after each epoch, and a run that finds one made with the same configuration goes
    on from the epoch after it: `make train` cut off part-way loses at most the epoch in progress."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ARCHITECTURES[cfg.model]()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    history: list[dict] = []
    best = {"val_loss": float("inf"), "epoch": 0}
    best_state = None
    first_epoch = 1
    identity = json.dumps({"config": asdict(cfg), "label": label, "train": len(x_train)}, sort_keys=True, default=str)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved["identity"] == identity:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            gen.set_state(saved["gen"])
            torch.set_rng_state(saved["torch_rng"])
            np.random.set_state(saved["numpy_rng"])
            random.setstate(saved["python_rng"])
            history, best, best_state = saved["history"], saved["best"], saved["best_state"]
            first_epoch = saved["epoch"] + 1
            print(f"{label}resumed from {checkpoint} after epoch {saved['epoch']}", flush=True)
        else:
            print(f"{label}{checkpoint} was made with another configuration: starting afresh", flush=True)

    def batch_loss(idx):
        xb, yb = x_train[idx], y_train[idx]
        if cfg.augment:
            xb = augment(xb, gen, cfg.erase)
        logits, _ = model(xb)
        loss = F.cross_entropy(logits, yb)
        return loss, loss, logits, yb, {}

    for epoch in range(first_epoch, cfg.epochs + 1):
        if epoch - best["epoch"] > cfg.patience:
            break  # the run this checkpoint came from had stopped early here
        model.train()
        t0 = time.time()
        train_loss, train_acc = train_epoch(model, opt, sched, x_train, cfg.batch_size, gen,
                                            f"{label}epoch {epoch}/{cfg.epochs}", batch_loss)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.time() - t0)
        history.append(row)
        improved = val_loss < best["val_loss"]
        if improved:
            best = {"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
        print(f"{label}epoch {epoch:2d}/{cfg.epochs} train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
              f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} {row['seconds']:.0f}s{' *best' if improved else ''}",
              flush=True)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            partial = checkpoint.with_suffix(".partial")
            torch.save({"identity": identity, "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), "history": history,
                        "best": best, "best_state": best_state}, partial)
            partial.replace(checkpoint)  # atomic: an interruption leaves the previous epoch's checkpoint whole
        if epoch - best["epoch"] >= cfg.patience:
            print(f"{label}early stop: no validation-loss improvement for {cfg.patience} epochs", flush=True)
            break
    assert best_state is not None, "at least one epoch ran"
    model.load_state_dict(best_state)
    model.eval()
    return model, history, best


def load_outliers(folder: Path) -> torch.Tensor:
    """Every <group>.u8 in `folder` (784 bytes per image, written by examples/preprocess) as model input."""
    files = sorted(folder.glob("*.u8"))
    if not files:
        raise DatasetError(f"no outlier images (*.u8) in {folder}: build them with `make ood-sets`")
    images = np.concatenate([np.frombuffer(f.read_bytes(), np.uint8).reshape(-1, 28, 28) for f in files])
    return to_tensor(images)


def jigsaw(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Garments cut into their 16 tiles of 7x7 pixels and reassembled in a random order: the dataset's own
    textures and strokes without a garment's shape, the outliers closest to the training data."""
    n = x.shape[0]
    tiles = x.reshape(n, 1, 4, 7, 4, 7).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, 1, 7, 7)
    order = torch.argsort(torch.rand(n, 16, generator=gen), dim=1)
    tiles = tiles[torch.arange(n)[:, None], order]
    return tiles.reshape(n, 4, 4, 1, 7, 7).permute(0, 3, 1, 4, 2, 5).reshape(n, 1, 28, 28)


def energy(logits: torch.Tensor) -> torch.Tensor:
    return -torch.logsumexp(logits, dim=1)


def expose(cfg: Config, model: torch.nn.Module, x_train, y_train, x_val, y_val, outliers: torch.Tensor,
           first_epoch: int, *, epochs: int | None = None, lr: float = EXPOSURE_LR, weights: torch.Tensor | None = None,
           seed: int | None = None, label: str = "exposure") -> list[dict]:
    """Outlier exposure: fine-tunes the trained model for `epochs` (default `cfg.exposure_epochs`) with the
    classification loss plus the energy hinges, on batches of training images and half as many outliers (half
    from `outliers`, drawn uniformly or by `weights` and turned by a random multiple of 90 degrees per batch,
    half jigsawed garments). Batch-norm statistics stay frozen at the values of the main training, so the
    outliers do not shift how garments are normalised."""
    epochs = cfg.exposure_epochs if epochs is None else epochs
    gen = torch.Generator().manual_seed((cfg.seed if seed is None else seed) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    m_in, m_out = EXPOSURE_MARGINS

    def batch_loss(idx):
        xb, yb = augment(x_train[idx], gen, cfg.erase), y_train[idx]
        k = max(1, len(idx) // 4)
        pick = (torch.randint(0, len(outliers), (k,), generator=gen) if weights is None
                else torch.multinomial(weights, k, replacement=True, generator=gen))
        ob = outliers[pick]
        ob = torch.rot90(ob, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
        ob = torch.cat([ob, jigsaw(x_train[idx[:k]], gen)])
        logits, _ = model(torch.cat([xb, ob]))
        logits_in, logits_out = logits[: len(idx)], logits[len(idx) :]
        ce = F.cross_entropy(logits_in, yb)
        hinge = (F.relu(energy(logits_in) - m_in).pow(2).mean() + F.relu(m_out - energy(logits_out)).pow(2).mean())
        return ce + EXPOSURE_WEIGHT * hinge, ce, logits_in, yb, {"hinge": f"{hinge.item():.3f}"}

    history = []
    for epoch in range(first_epoch, first_epoch + epochs):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        t0 = time.time()
        train_loss, train_acc = train_epoch(model, opt, sched, x_train, cfg.batch_size, gen,
                                            f"{label} epoch {epoch}", batch_loss)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        row = dict(epoch=epoch, phase=label, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc, seconds=time.time() - t0)
        history.append(row)
        print(f"{label} epoch {epoch} train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
              f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} {row['seconds']:.0f}s", flush=True)
    model.eval()
    return history


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_train_val(images, labels, val_size: int, seed: int):
    """A fixed, stratification-free random split; the same seed always carves the same validation set,
    which the OOD threshold calibration reuses (it must only ever see held-in data)."""
    perm = np.random.default_rng(seed).permutation(len(images))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return train_idx, val_idx


def cross_validate(cfg: Config, images, labels, out_dir: Path) -> dict:
    rng = np.random.default_rng(cfg.seed)
    folds = np.array_split(rng.permutation(len(images)), cfg.folds)
    accs, losses = [], []
    for k in range(cfg.folds):
        val_idx = folds[k]
        train_idx = np.concatenate([folds[j] for j in range(cfg.folds) if j != k])
        _, _, best = fit(cfg, to_tensor(images[train_idx]), torch.from_numpy(labels[train_idx]),
                         to_tensor(images[val_idx]), torch.from_numpy(labels[val_idx]), label=f"fold {k + 1}/{cfg.folds} ")
        accs.append(best["val_acc"])
        losses.append(best["val_loss"])
        print(f"fold {k + 1}/{cfg.folds}: val_acc {best['val_acc']:.4f} val_loss {best['val_loss']:.4f}", flush=True)
    result = {
        "model": cfg.model, "folds": cfg.folds, "epochs_per_fold": cfg.epochs,
        "val_acc_mean": float(np.mean(accs)), "val_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "val_loss_mean": float(np.mean(losses)), "val_acc_per_fold": accs, "config": asdict(cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{cfg.model}.cv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cfg.model} {cfg.folds}-fold CV: val_acc {result['val_acc_mean'] * 100:.2f}% ± "
          f"{result['val_acc_std'] * 100:.2f} (mean ± sd)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(ARCHITECTURES), required=True)
    p.add_argument("--epochs", type=int, help="maximum epochs (default per model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--erase", type=float, help="probability of random erasing per training image (default per model)")
    p.add_argument("--exposure-epochs", type=int, help="outlier-exposure fine-tuning epochs (default per model)")
    p.add_argument("--exposure-dir", default=str(REPO / "build/ood-exposure"),
                   help="folder of <group>.u8 outlier images for the exposure stage")
    p.add_argument("--init-from", default="", help="a saved state dict (<model>.pt): skip the main training")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation instead of a training run")
    p.add_argument("--smoke", action="store_true", help="one short epoch on a 3,000-image subset")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--out-dir", default=str(REPO / "models"))
    a = p.parse_args(argv)

    d = DEFAULTS[a.model]
    cfg = Config(
        model=a.model, epochs=a.epochs or d["epochs"], batch_size=a.batch_size or d["batch_size"],
        lr=a.lr or d["lr"], weight_decay=a.weight_decay if a.weight_decay is not None else d["weight_decay"],
        patience=a.patience or d["patience"], augment=d["augment"] and not a.no_augment,
        erase=a.erase if a.erase is not None else d["erase"],
        exposure_epochs=a.exposure_epochs if a.exposure_epochs is not None else d["exposure_epochs"],
        exposure_dir=a.exposure_dir, init_from=a.init_from,
        val_size=a.val_size, seed=a.seed, threads=a.threads, smoke=a.smoke, folds=a.folds, data_dir=a.data_dir,
    )
    if cfg.smoke:
        cfg.epochs, cfg.val_size = a.epochs or 1, 500
        cfg.exposure_epochs = min(cfg.exposure_epochs, 1)
    torch.set_num_threads(cfg.threads)
    out_dir = Path(a.out_dir)

    try:
        images, labels = load_split("train", Path(cfg.data_dir))
        load_split("test", Path(cfg.data_dir))  # checked now so a broken test file fails before training, not after
        outliers = load_outliers(Path(cfg.exposure_dir)) if cfg.exposure_epochs and not cfg.folds else None
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.smoke:
        images, labels = images[:3000], labels[:3000]
    if cfg.folds:
        cross_validate(cfg, images, labels, out_dir)
        return 0

    train_idx, val_idx = split_train_val(images, labels, cfg.val_size, cfg.seed)
    x_train, y_train = to_tensor(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_val, y_val = to_tensor(images[val_idx]), torch.from_numpy(labels[val_idx])
    print(f"{cfg.model}: {len(x_train)} train / {len(x_val)} validation images, {cfg.threads} threads, "
          f"config {asdict(cfg)}", flush=True)
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Per-epoch checkpoints outside models/, deleted once the version is written: a rerun after an interruption
    # (during training or the exposure after it) goes on from the last whole epoch.
    checkpoint = REPO / "build" / "train-checkpoints" / f"{cfg.model}{'-smoke' if cfg.smoke else ''}.pt"
    if cfg.init_from:
        model = ARCHITECTURES[cfg.model]()
        model.load_state_dict(torch.load(cfg.init_from))
        saved = json.loads(Path(cfg.init_from + ".json").read_text())
        history, best = saved["history"], saved["best"]
        t0 -= saved.get("seconds", 0.0)  # the metadata reports the time of both stages
    else:
        model, history, best = fit(cfg, x_train, y_train, x_val, y_val, checkpoint=checkpoint)
        # The best weights in PyTorch form too (git-ignored), with their history: --init-from starts here.
        torch.save(model.state_dict(), out_dir / f"{cfg.model}.pt")
        (out_dir / f"{cfg.model}.pt.json").write_text(
            json.dumps({"history": history, "best": best, "seconds": time.time() - t0}) + "\n")
    if outliers is not None:
        print(f"outlier exposure: {len(outliers)} outlier images from {cfg.exposure_dir} + jigsawed garments", flush=True)
        exposure = expose(cfg, model, x_train, y_train, x_val, y_val, outliers, len(history) + 1)
        history = history + exposure
        # What ships is the exposed model: its validation figures replace the checkpoint's.
        best = {"epoch": exposure[-1]["epoch"], "val_loss": exposure[-1]["val_loss"], "val_acc": exposure[-1]["val_acc"]}
    train_seconds = time.time() - t0
    # The next version in the repository: a serving server picks it up, the previous one stays for rollback.
    version_dir = new_version_dir(out_dir, cfg.model)
    plot_curves(history, version_dir / "curves.png", f"{cfg.model}: best epoch {best['epoch']}")

    from export import export_and_evaluate  # imported late: onnx/onnxruntime are only needed here

    export_and_evaluate(model, cfg=asdict(cfg), history=history, best=best, train_seconds=train_seconds,
                        x_val=x_val, out_dir=version_dir, data_dir=Path(cfg.data_dir))
    checkpoint.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
