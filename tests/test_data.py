"""Dataset readers (torchvision layouts, strict parsing) and the on-device loader."""

import gzip
import pickle
import shutil

import numpy as np
import pytest
import torch

from varprune.data import DATASETS, DatasetError, DeviceLoader, load_dataset, parse_cifar_batch, parse_idx, subset
from varprune.tasks import Classification, crop_flip


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(root, n_train=30, n_test=10, gz=True, layout="flat"):
    folder = {"flat": root, "raw": root / "raw", "torchvision": root / "FashionMNIST" / "raw"}[layout]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        files[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, arr in files.items():
        raw = idx_bytes(arr)
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return files


def test_fashion_mnist_from_the_debian_package(fmnist_dir):
    data = load_dataset("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10


@pytest.mark.parametrize("layout", ["flat", "raw", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_layouts(tmp_path, layout, gz):
    files = write_fake_mnist(tmp_path, gz=gz, layout=layout)
    data = load_dataset("fashion-mnist", tmp_path)
    assert np.array_equal(data.train_x[:, 0].numpy(), files["train-images-idx3-ubyte"])
    assert np.array_equal(data.test_y.numpy(), files["t10k-labels-idx1-ubyte"])


def test_missing_dataset_names_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match=f"not found in {tmp_path}.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DatasetError, match="--download"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(DatasetError, match="header promises"):
        parse_idx(good[:-5])
    with pytest.raises(DatasetError, match="short header|magic"):
        parse_idx(good[:6])
    write_fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])  # truncated gzip
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("fashion-mnist", tmp_path)


def fake_cifar(n=4):
    return {b"data": np.arange(n * 3072, dtype=np.int64).astype(np.uint8).reshape(n, 3072), b"labels": list(range(n))}


def test_cifar10_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(fake_cifar()))
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x[0, 0, 0, :3].tolist() == [0, 1, 2]  # channel-major rows, as CIFAR stores them


def test_cifar_batch_of_the_wrong_layout():
    bad = fake_cifar()
    bad[b"data"] = bad[b"data"][:, :3000]
    with pytest.raises(DatasetError, match="expected \\(N, 3072\\)"):
        parse_cifar_batch(pickle.dumps(bad), "batch", b"labels")
    with pytest.raises(DatasetError, match="lacks the CIFAR keys"):
        parse_cifar_batch(pickle.dumps({b"x": 1}), "batch", b"labels")


def test_cifar_reader_refuses_arbitrary_pickles():
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, ("/nonexistent",))

    with pytest.raises(DatasetError, match="not a CIFAR python batch"):
        parse_cifar_batch(pickle.dumps(Evil()), "batch", b"labels")


def test_subset_is_deterministic_and_seed_independent():
    x, y = torch.arange(100).view(100, 1, 1, 1), torch.arange(100)
    a = subset(x, y, 10)
    b = subset(x, y, 10)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10 and len(set(a[1].tolist())) == 10


def make_loader(n=103, batch=16, seed=0, train=True, info="cifar10"):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return DeviceLoader(images, torch.arange(n), DATASETS[info], batch, train=train, seed=seed, augment=None)


def test_loader_yields_every_example_once_per_epoch():
    loader = make_loader()
    for _ in range(2):
        labels = torch.cat([y for _, y in loader])
        assert sorted(labels.tolist()) == list(range(103))
    assert len(loader) == 7


def test_loader_same_seed_same_batches_and_epochs_differ():
    a, b, c = make_loader(seed=3), make_loader(seed=3), make_loader(seed=4)
    ea = [y for _, y in a]
    assert all(torch.equal(p, q) for p, q in zip(ea, [y for _, y in b]))
    assert not torch.equal(torch.cat(ea), torch.cat([y for _, y in c]))
    assert not torch.equal(torch.cat(ea), torch.cat([y for _, y in a]))  # a new order each epoch


def test_augmentation_shapes_and_value_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out, _ = crop_flip(x, None, 4, False, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # a crop is the image shifted by (dy, dx) in [-4, 4] with zero fill: find the shift and check it
    for i in range(8):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = torch.zeros_like(x[i])
                src = x[i][:, max(0, dy) : 32 + min(0, dy), max(0, dx) : 32 + min(0, dx)]
                shifted[:, max(0, -dy) : 32 + min(0, -dy), max(0, -dx) : 32 + min(0, -dx)] = src
                found |= torch.equal(shifted, out[i])
        assert found
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    info = DATASETS["fashion-mnist"]
    task = Classification(10, info.crop_pad, info.flip)
    loader = DeviceLoader(images, torch.zeros(40, dtype=torch.long), info, 8, train=True, augment=task.augment)
    lo, hi = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
    for xb, _ in loader:
        assert xb.shape == (8, 1, 28, 28) and xb.dtype == torch.float32
        assert xb.min() >= lo - 1e-5 and xb.max() <= hi + 1e-5


def test_eval_loader_is_ordered_and_unaugmented():
    loader = make_loader(train=False)
    x, y = next(iter(loader))
    assert y.tolist() == list(range(16))
    assert torch.allclose(x, loader.normalize(loader.images[:16]))


# ---------------------------------------------------------------- --image-size for every set


def test_resize_images_matches_pil_bilinear():
    from PIL import Image

    from varprune.data import resize_images

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    for size in (16, 40):  # shrinking (antialiased) and growing
        ours = resize_images(torch.from_numpy(x), (size, size))
        pil = np.stack([np.asarray(Image.fromarray(im[0]).resize((size, size), Image.BILINEAR)) for im in x])[:, None]
        assert ours.dtype == torch.uint8 and ours.shape == (3, 1, size, size)
        assert np.abs(ours.numpy().astype(int) - pil.astype(int)).max() <= 1
    same = torch.from_numpy(x)
    assert resize_images(same, (28, 28)) is same


def test_image_size_resizes_a_torchvision_set_once(tmp_path):
    write_fake_mnist(tmp_path, n_train=12, n_test=5)
    native = load_dataset("mnist", tmp_path)
    small = load_dataset("mnist", tmp_path, image_size=16)
    assert small.info.size == 16 and native.info.size == 28
    assert small.info.crop_pad == 1  # 2 px of padding at 28 px, scaled
    assert small.train_x.shape == (12, 1, 16, 16) and small.test_x.shape == (5, 1, 16, 16)
    from varprune.data import resize_images

    assert torch.equal(small.train_x, resize_images(native.train_x, (16, 16)))
    assert torch.equal(small.train_y, native.train_y)
    (tmp_path / "c").mkdir()
    fake_cifar_dir = tmp_path / "c"
    (fake_cifar_dir / "cifar-10-batches-py").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (fake_cifar_dir / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(fake_cifar()))
    big = load_dataset("cifar10", fake_cifar_dir, image_size=40)
    assert big.train_x.shape[1:] == (3, 40, 40) and big.info.crop_pad == 5
