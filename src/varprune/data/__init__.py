"""Data: one module per family of on-disk layouts, a registry of names, and the on-device loader.

* base.py       what every family shares (DatasetInfo, ImageData, DatasetLocation, resize_images)
* vision.py     torchvision layouts: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN
* folders.py    image folders (ImageFolder, Tiny ImageNet), decoded once and cached; streaming.py when too big
* segmentation.py   segmentation sets: volumes.py (MSD, Colin27), segfolder.py (image/mask folders)
* text.py       text: plain text and WikiText, JSONL classification, fortunes (a demonstration corpus);
                tokenizer.py (byte-level BPE, or a model folder's), tokens.py (token streams and loaders),
                identity.py (the sha256 digests a text run records of its text and tokenizer)
* instructions.py   instruction records (Alpaca, LLM-Adapters) for fine-tuning; instructtokens.py (their
                examples, with the prompt carrying no loss, and their loader)
* registry.py   name -> family; ``load_dataset``, ``locate_dataset``
* loader.py     DeviceLoader (data on the device), fixed subsets and validation splits

Data knows nothing of models, tasks or training.
"""

from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation, ImageData, resize_images
from varprune.data.calibtext import calibration_windows
from varprune.data.identity import content_digest, file_sha256, text_digests
from varprune.data.loader import VALIDATION_SEED, DeviceLoader, share, subset, validation_indices
from varprune.data.registry import (
    DATASETS,
    FOLDER_SETS,
    dataset_info,
    default_data_dir,
    list_datasets,
    load_dataset,
    locate_dataset,
)
from varprune.data.text import TextCorpus, TextSplit
from varprune.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer
from varprune.data.tokens import (
    TokenExampleLoader,
    TokenizedText,
    TokenWindowLoader,
    calibration_inputs,
    encode_stream,
    stream_windows,
    text_loader,
    tokenize,
)
from varprune.data.vision import DEBIAN_FASHION_MNIST, parse_cifar_batch, parse_idx, read_idx

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "FOLDER_SETS",
    "VALIDATION_SEED",
    "DatasetError",
    "DatasetInfo",
    "DatasetLocation",
    "DeviceLoader",
    "ImageData",
    "TextCorpus",
    "TextSplit",
    "TextTokenizer",
    "TokenExampleLoader",
    "TokenWindowLoader",
    "TokenizedText",
    "calibration_inputs",
    "calibration_windows",
    "content_digest",
    "dataset_info",
    "default_data_dir",
    "encode_stream",
    "file_sha256",
    "list_datasets",
    "load_dataset",
    "load_tokenizer",
    "locate_dataset",
    "parse_cifar_batch",
    "parse_idx",
    "read_idx",
    "resize_images",
    "share",
    "stream_windows",
    "subset",
    "text_digests",
    "text_loader",
    "tokenize",
    "train_tokenizer",
    "validation_indices",
]
