"""Local text documents as a TFDS dataset (array_record), read back by random access.

No TensorFlow is involved: `download_and_prepare(file_format="array_record")` writes the
records, and `tfds.data_source` reads them with only `dataset_info.json` to go on, so a reader
(another process, another machine) never needs the builder class below.

Documents are split WHOLE into 'train' and 'validation', so no validation text leaks into
training (nor into the tokenizer, which trains on the train split only).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from cla_jax.data.sources import split_document_names
from cla_jax.errors import UserError

DATASET_VERSION = "1.0.0"
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _fingerprint(documents: Mapping[str, str], splits: Mapping[str, Sequence[str]]) -> str:
    content = {
        split: [[n, hashlib.sha256(documents[n].encode("utf-8")).hexdigest()] for n in names]
        for split, names in splits.items()
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class LocalTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds one named text dataset from documents held in memory.

    Not registered with TFDS (its name is chosen per instance, and readers go through the
    files), so several datasets, or the same one twice, can be built in one process.
    """

    VERSION = tfds.core.Version(DATASET_VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup, for a builder inside a package, needs the `importlib_resources`
        # backport (not installed on Python >= 3.9). It only looks for a checksums file here.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        name: str,
        documents: Mapping[str, str],
        splits: Mapping[str, Sequence[str]],
        data_dir: str | pathlib.Path,
    ):
        self.name = name  # Shadows the class attribute TFDS would derive from the class name.
        self._documents = documents
        self._splits = splits
        self.fingerprint = _fingerprint(documents, splits)
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        # dataset_info_from_configs() needs the builder to live in a registered package.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents, split whole into train/validation.",
            features=tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            disable_shuffling=True,  # Keep document order; TFDS would otherwise order by key hash.
            metadata=tfds.core.MetadataDict(fingerprint=self.fingerprint),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(names) for split, names in self._splits.items()}

    def _generate_examples(self, names: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
        for index, name in enumerate(names):
            yield index, {"name": name, "text": self._documents[name]}

    # TFDS prints a "Downloading and preparing" banner and a "prepared" line to stdout so that
    # a user can cancel a long download; these documents are already in memory.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@contextlib.contextmanager
def _without_tfds_progress_bars():
    """TFDS draws bars for generating and shuffling each split: four bars that flash by for
    documents already in memory."""
    previous = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)


def build_text_dataset(
    documents: Mapping[str, str],
    data_dir: str | pathlib.Path,
    name: str = "local_text",
    validation_fraction: float = 0.1,
    validation_names: Sequence[str] | None = None,
) -> dict[str, int]:
    """Prepares `data_dir/name/1.0.0/` from {document name: text}; returns documents per split.

    Idempotent: a second call with the same documents reuses the files. Different documents
    under an existing name raise an error instead of silently reusing stale data.
    """
    if not _DATASET_NAME.match(name):
        raise UserError(f"dataset name {name!r} must match {_DATASET_NAME.pattern}")
    splits = split_document_names(list(documents), validation_fraction, validation_names)
    builder = LocalTextBuilder(name=name, documents=documents, splits=splits, data_dir=data_dir)
    # is_prepared() warns about a dataset directory that does not exist yet: a first build.
    if epath.Path(builder.data_path).exists() and builder.is_prepared():
        stored = builder.info.metadata.get("fingerprint") if builder.info.metadata else None
        if stored != builder.fingerprint:
            raise UserError(
                f"{builder.data_dir} holds other documents than those given; delete it or "
                "choose another dataset name"
            )
    else:
        with _without_tfds_progress_bars():
            builder.download_and_prepare()
    return {split: builder.info.splits[split].num_examples for split in splits}


class TextColumn(Sequence[str]):
    """Random-access view of one text feature of a TFDS data source, decoded to str."""

    def __init__(self, source: Any, key: str):
        self._source = source
        self._key = key

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, value: bytes | str) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def __getitem__(self, index: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._decode(self._source[index % len(self)][self._key])

    def __iter__(self) -> Iterator[str]:
        chunk = 64  # Batched reads: far fewer round trips into array_record.
        for start in range(0, len(self), chunk):
            indices = list(range(start, min(start + chunk, len(self))))
            for record in self._source.__getitems__(indices):
                yield self._decode(record[self._key])


def _open_source(name: str, split: str, data_dir: str | pathlib.Path, download: bool) -> Any:
    try:
        return tfds.data_source(name, split=split, data_dir=str(data_dir), download=download)
    except tfds.core.registered.DatasetNotFoundError:
        where = f"in the TFDS catalogue nor under {data_dir}" if download else f"under {data_dir}"
        hint = "" if download else "; run build_text_dataset first"
        raise FileNotFoundError(f"no TFDS dataset {name!r} {where}{hint}") from None


def load_documents(
    data_dir: str | pathlib.Path, name: str, split: str, key: str = "text"
) -> Sequence[str]:
    """The texts (or, with key="name", the names) of a prepared split, in stored order."""
    return TextColumn(_open_source(name, split, data_dir, download=False), key)
