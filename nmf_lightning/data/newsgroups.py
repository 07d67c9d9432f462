"""TF-IDF (or word counts) of 20 newsgroups, as the 20 newsgroups notebook builds it.

Documents come from scikit-learn's ``fetch_20newsgroups`` or, offline, from the original
``20news-bydate.tar.gz`` read the way the fetcher reads its cache, so both routes give
the same documents in the same order.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nmf_lightning.data.sources import Matrix
from nmf_lightning.validation import MissingFileError, NMFInputError

#: the four groups of the 20 newsgroups notebook
NOTEBOOK_CATEGORIES = ("alt.atheism", "talk.religion.misc", "comp.graphics", "sci.space")
_SUBSETS = {"train": ("20news-bydate-train",), "test": ("20news-bydate-test",)}
_SUBSETS["all"] = _SUBSETS["train"] + _SUBSETS["test"]
_REMOVE = ("headers", "footers", "quotes")


def newsgroups(
    categories: Sequence[str] | None = NOTEBOOK_CATEGORIES,
    subset: str = "train",
    remove: Sequence[str] = _REMOVE,
    archive: str | None = None,
    data_home: str | None = None,
    shuffle: bool = True,
    random_state: int = 42,
    vectorizer: dict | None = None,
    weighting: str = "tfidf",
) -> Matrix:
    """Documents x vocabulary matrix (sparse CSR) with the vocabulary as column names.

    ``weighting`` is ``tfidf`` (``TfidfVectorizer``, the notebook's) or ``counts``
    (``CountVectorizer``: raw word counts, the data the KL loss is the likelihood of).
    ``archive`` is a path to ``20news-bydate.tar.gz`` (read offline); without it the
    scikit-learn fetcher is used (its cache in ``data_home``, downloading if missing).
    ``vectorizer`` holds keyword arguments of the vectorizer (default: English stop
    words, as in the notebook). ``categories=None`` keeps all 20 groups.
    """
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    vectorizers = {"tfidf": TfidfVectorizer, "counts": CountVectorizer}
    if weighting not in vectorizers:
        raise NMFInputError(f"data.weighting={weighting!r} is not one of {sorted(vectorizers)}.")
    texts, target_names = load_documents(categories, subset, remove, archive, data_home, shuffle, random_state)
    options = {"stop_words": "english"} if vectorizer is None else dict(vectorizer)
    words = vectorizers[weighting](**options)
    X = words.fit_transform(texts).tocsr().astype(np.float64)
    return Matrix(
        X,
        name="newsgroups",
        col_names=words.get_feature_names_out().tolist(),
        info={"categories": list(target_names), "subset": subset, "n_documents": len(texts), "weighting": weighting},
    )


def load_documents(
    categories: Sequence[str] | None = NOTEBOOK_CATEGORIES,
    subset: str = "train",
    remove: Sequence[str] = _REMOVE,
    archive: str | None = None,
    data_home: str | None = None,
    shuffle: bool = True,
    random_state: int = 42,
) -> tuple[list[str], list[str]]:
    """Texts and the kept group names, exactly as ``fetch_20newsgroups(...).data`` gives them."""
    if subset not in _SUBSETS:
        raise NMFInputError(f"data.subset={subset!r} is not one of {tuple(_SUBSETS)}.")
    unknown = sorted(set(remove) - set(_REMOVE))
    if unknown:
        raise NMFInputError(f"data.remove has unknown parts {unknown}; choose from {_REMOVE}.")
    if archive is None:
        from sklearn.datasets import fetch_20newsgroups

        try:
            names = fetch_20newsgroups(data_home=data_home, subset="train", download_if_missing=True).target_names
        except OSError as err:  # URLError and friends: no network, no cache
            raise NMFInputError(
                f"scikit-learn could not download 20 newsgroups ({err}) and has no copy in its cache; "
                "give the archive with data.archive=PATH/20news-bydate.tar.gz (read offline)."
            ) from None
        _check_categories(categories, names)
        bunch = fetch_20newsgroups(
            data_home=data_home,
            subset=subset,
            categories=None if categories is None else list(categories),
            remove=tuple(remove),
            shuffle=shuffle,
            random_state=random_state,
        )
        return list(bunch.data), list(bunch.target_names)
    texts, target, names = _read_archive(Path(archive), _SUBSETS[subset])
    return _select(texts, target, names, categories, remove, shuffle, random_state)


def _read_archive(path: Path, folders: tuple[str, ...]) -> tuple[list[str], np.ndarray, list[str]]:
    """Read posts as ``sklearn.datasets.load_files(..., encoding='latin1')`` orders them."""
    if not path.is_file():
        raise MissingFileError(
            f"data.archive={str(path)!r} does not exist; give the path of 20news-bydate.tar.gz "
            "or drop data.archive to use scikit-learn's fetcher."
        )
    try:
        with tarfile.open(path, "r:*") as tar:
            # one sequential pass: random access into a gzip stream would re-read it per post
            contents = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise NMFInputError(f"data.archive={str(path)!r} is not a readable tar archive: {err}") from err
    texts: list[str] = []
    target: list[int] = []
    names: list[str] = []
    for top in folders:
        posts = [n for n in contents if n.startswith(top + "/") and n.count("/") == 2]
        groups = sorted({n.split("/")[1] for n in posts})
        if not groups:
            raise NMFInputError(f"data.archive={str(path)!r} has no {top}/<group>/<post> files.")
        names = groups
        by_group: dict[str, list[str]] = {g: [] for g in groups}
        for n in posts:
            by_group[n.split("/")[1]].append(n)
        files = [(label, name) for label, g in enumerate(groups) for name in sorted(by_group[g])]
        order = np.arange(len(files))
        np.random.RandomState(0).shuffle(order)  # load_files' default shuffle
        for i in order:
            label, name = files[i]
            texts.append(contents[name].decode("latin1"))
            target.append(label)
    return texts, np.asarray(target), names


def _select(
    texts: list[str],
    target: np.ndarray,
    names: list[str],
    categories: Sequence[str] | None,
    remove: Sequence[str],
    shuffle: bool,
    random_state: int,
) -> tuple[list[str], list[str]]:
    """Strip, filter and shuffle in the fetcher's order."""
    from sklearn.datasets._twenty_newsgroups import (
        strip_newsgroup_footer,
        strip_newsgroup_header,
        strip_newsgroup_quoting,
    )

    for part, strip in (
        ("headers", strip_newsgroup_header),
        ("footers", strip_newsgroup_footer),
        ("quotes", strip_newsgroup_quoting),
    ):
        if part in remove:
            texts = [strip(t) for t in texts]
    kept = list(names)
    if categories is not None:
        _check_categories(categories, names)
        labels = sorted(names.index(c) for c in categories)
        keep = np.isin(target, labels)
        texts = [t for t, k in zip(texts, keep, strict=True) if k]
        target = np.searchsorted(labels, target[keep])
        kept = [names[i] for i in labels]
    if shuffle:
        order = np.arange(len(texts))
        np.random.RandomState(random_state).shuffle(order)
        texts = [texts[i] for i in order]
    return texts, kept


def _check_categories(categories: Sequence[str] | None, names: Sequence[str]) -> None:
    if categories is None:
        return
    unknown = [c for c in categories if c not in names]
    if unknown:
        raise NMFInputError(f"data.categories has unknown groups {unknown}; the groups are {list(names)}.")
