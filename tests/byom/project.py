"""Builds a "user project" on disk, as a team that has never used slimray would have it: its own model code
(``user_models.py`` beside this file), a teacher trained briefly and saved as safetensors, and its data as
files (an image folder of PNGs, Parquet with a list column, CSV with feature columns), plus a config."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

CODE_DIR = Path(__file__).resolve().parent
if str(CODE_DIR) not in sys.path:  # the user's code folder, as teacher.code_dir puts it on slimray's path
    sys.path.insert(0, str(CODE_DIR))


def digits_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))
    return d.images[idx].astype(np.float32) / 16.0, d.target[idx].astype(np.int64)  # (N, 8, 8) in [0, 1]


def train_teacher(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 30, seed: int = 0,
                  lr: float = 3e-3) -> torch.nn.Module:
    """The user's own training: a few seconds of Adam on normalised inputs."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def write_image_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(d / f"{i:05d}.png")


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"pixels": [row.reshape(-1).tolist() for row in x], "label": y}), path)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> list[str]:
    cols = [f"f{i}" for i in range(x.reshape(len(x), -1).shape[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = x.reshape(len(x), -1)
    with open(path, "w") as f:
        f.write(",".join(cols + ["label"]) + "\n")
        for row, label in zip(flat, y):
            f.write(",".join(f"{v:.6g}" for v in row) + f",{label}\n")
    return cols


def resnet_project(root: Path, *, name: str = "user-resnet") -> Path:
    """A residual CNN with BatchNorm (the user's) on digits as an image folder of PNGs; returns the config path."""
    import user_models  # noqa: F401  (CODE_DIR is on sys.path in the tests)

    x, y = digits_arrays()
    n_test = 300
    write_image_folder(root / "data" / "train", x[n_test:], y[n_test:])
    write_image_folder(root / "data" / "test", x[:n_test], y[:n_test])
    teacher = train_teacher(user_models.resnet(in_channels=1, num_classes=10, width=24), ((x[n_test:] - 0.3) / 0.4)[:, None], y[n_test:], epochs=12)
    save_file(teacher.state_dict(), str(root / "teacher.safetensors"))
    cfg = {
        "name": name,
        "data": {"source": "files", "train": "data/train", "test": "data/test", "val_fraction": 0.15, "mean": [0.3], "std": [0.4]},
        "teacher": {"source": "module", "factory": "user_models:resnet", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 24},
                    "weights": "teacher.safetensors", "code_dir": str(CODE_DIR)},
        "distill": {"derive": {"keep": 0.5, "drop_blocks": 1}, "epochs": 6, "batch_size": 64, "lr": 3e-3, "num_workers": 2, "labels_only_baseline": False},
        "search": {"space": {"prune_ratios": [0.0, 0.3], "quantizations": ["none"], "runtimes": ["torch", "onnxruntime"]},
                   "finetune_epochs": 1, "num_timing_repeats": 5, "serving_batch_size": 32},
        "eval": {"metric": "user_metrics:macro_f1", "max_drop": 0.03},  # the user's own metric, in its own units
    }
    path = root / "slimray.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mlp_project(root: Path, *, name: str = "user-mlp", code_dir: Path = CODE_DIR, epochs: int = 8, num_workers: int = 2) -> Path:
    """An MLP with LayerNorm (the user's) on digits as Parquet (a list column); returns the config path."""
    import user_models  # noqa: F401

    x, y = digits_arrays(seed=1)
    write_parquet(root / "data" / "digits.parquet", x, y)
    flat = x.reshape(len(x), -1)
    teacher = train_teacher(user_models.mlp(num_features=64, num_classes=10, hidden=[256, 128]), (flat - flat.mean()) / flat.std(), y, epochs=15)
    save_file(teacher.state_dict(), str(root / "teacher.safetensors"))
    cfg = {
        "name": name,
        "data": {"source": "files", "train": "data/digits.parquet", "input_column": "pixels", "label_column": "label",
                 "val_fraction": 0.15, "test_fraction": 0.15, "seed": 3},
        "teacher": {"source": "module", "factory": "user_models:mlp", "kwargs": {"num_features": 64, "num_classes": 10, "hidden": [256, 128]},
                    "weights": "teacher.safetensors", "code_dir": str(code_dir)},
        "distill": {"derive": {"keep": 0.3}, "epochs": epochs, "batch_size": 64, "lr": 3e-3, "num_workers": num_workers,
                    "labels_only_baseline": False},
        "search": {"space": {"prune_ratios": [0.0, 0.3], "quantizations": ["none", "dynamic_int8"], "runtimes": ["torch"]},
                   "finetune_epochs": 1, "num_timing_repeats": 5, "max_accuracy_drop": 3.0, "serving_batch_size": 32},
    }
    path = root / "slimray.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def hf_resnet_project(root: Path, *, name: str = "user-hf-resnet") -> Path:
    """A Hugging Face ResNet image classifier (the user's, trained briefly) saved with save_pretrained, on digits as
    an image folder of PNGs; returns the config path."""
    import transformers

    from slimray.families.classifier.hf import HFImageClassifier

    x, y = digits_arrays(seed=2)
    n_test = 300
    write_image_folder(root / "data" / "train", x[n_test:], y[n_test:])
    write_image_folder(root / "data" / "test", x[:n_test], y[:n_test])
    config = transformers.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[24, 48], depths=[2, 2], layer_type="basic",
                                       num_labels=10, downsample_in_first_stage=False, embedding_kernel_size=3)
    torch.manual_seed(0)
    hf = transformers.ResNetForImageClassification(config)
    train_teacher(HFImageClassifier(hf), ((x[n_test:] - 0.3) / 0.4)[:, None], y[n_test:], epochs=10)
    hf.save_pretrained(root / "hf-teacher")
    cfg = {
        "name": name,
        "data": {"source": "files", "train": "data/train", "test": "data/test", "val_fraction": 0.15, "mean": [0.3], "std": [0.4]},
        "teacher": {"source": "huggingface", "path": "hf-teacher"},
        "distill": {"derive": {"keep": 0.5}, "epochs": 5, "batch_size": 64, "lr": 3e-3, "num_workers": 2, "labels_only_baseline": False},
        "search": {"space": {"prune_ratios": [0.0, 0.3], "quantizations": ["none"], "runtimes": ["torch"]},
                   "finetune_epochs": 1, "num_timing_repeats": 5, "max_accuracy_drop": 5.0, "serving_batch_size": 32},
    }
    path = root / "slimray.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def vit_project(root: Path, *, epochs: int = 40) -> tuple[Path, Path, Path, Path]:
    """A small vision transformer (the user's: patch embedding, learned positions, ``nn.TransformerEncoder`` with 4
    layers, mean pooling) trained on its training file of digits and saved as safetensors; the digits as ``.npz``
    (arrays ``x``, ``y``): 80% in the training file the teacher saw every example of, 20% held out in a file it never
    saw. Returns (weights, training data, held-out data, code folder): what ``slimray init`` takes."""
    import user_models  # noqa: F401

    x, y = digits_arrays(seed=4)
    n_train = int(0.8 * len(y))
    data, held_out = root / "digits.npz", root / "digits_heldout.npz"
    np.savez(data, x=x[:n_train, None], y=y[:n_train])
    np.savez(held_out, x=x[n_train:, None], y=y[n_train:])
    torch.manual_seed(0)  # the ViT's initialisation too; Adam at 3e-3 left this post-norm transformer untrained at times
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores took 16 min here under load; 1 thread ~1.5-2.5 min
    try:
        teacher = train_teacher(user_models.vit(), x[:n_train, None], y[:n_train], epochs=epochs, lr=1e-3)
    finally:
        torch.set_num_threads(threads)
    weights = root / "teacher.safetensors"
    save_file(teacher.state_dict(), str(weights))
    return weights, data, held_out, CODE_DIR


def user_code_folder(folder: Path, *, module: str, package: bool = False) -> Path:
    """A copy of the user's model code (``user_models.py``) under another module name, in a folder of its own that
    nothing puts on ``sys.path`` (so only ``teacher.code_dir`` or an artifact's carried copy can provide it); as a
    package (``module/__init__.py`` importing ``module/nets.py`` relatively) with ``package``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = (CODE_DIR / "user_models.py").read_text()
    if package:
        (folder / module).mkdir()
        (folder / module / "nets.py").write_text(source)
        (folder / module / "__init__.py").write_text("from .nets import mlp, resnet, vit  # noqa: F401\n")
    else:
        (folder / f"{module}.py").write_text(source)
    return folder
