import codecs
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from nmf_lightning.data import NMFDataModule, digits, from_file, known_factors, newsgroups, synthetic, toy
from nmf_lightning.data.newsgroups import load_documents
from nmf_lightning.data.rows import materialize
from nmf_lightning.validation import NMFInputError, check_matrix

GROUPS = ["alt.atheism", "comp.graphics", "sci.space", "talk.religion.misc"]
WORDS = {
    "alt.atheism": "god belief atheism argument morality",
    "comp.graphics": "image pixel render polygon graphics",
    "sci.space": "orbit shuttle launch nasa rocket",
    "talk.religion.misc": "church bible faith prophecy scripture",
}


def test_toy_is_the_masked_notebook_matrix():
    X = toy().X
    assert X.shape == (4, 3)
    assert np.isnan(X[0, 0]) and np.isnan(X).sum() == 1
    np.testing.assert_array_equal(X[1:], [[4, 4, 5], [5, 3, 4], [2, 3, 3]])


def test_known_factors_reproduce_the_als_notebook_matrix():
    m = known_factors()
    assert m.X.shape == (12, 10)
    # first rows printed by the notebook
    np.testing.assert_array_equal(m.X[1], [0, 5, 0, 0, 5, 0, 0, 0, 5, 0])
    np.testing.assert_array_equal(m.X[2], [9, 14, 0, 0, 14, 9, 9, 9, 14, 0])
    np.testing.assert_allclose(m.W_true @ m.H_true, m.X)


def test_synthetic_has_the_requested_shape_rank_and_noise():
    clean = synthetic(n_rows=60, n_cols=40, true_rank=4, noise=0.0, seed=1)
    assert clean.X.shape == (60, 40)
    assert np.linalg.matrix_rank(clean.X) == 4
    noisy = synthetic(n_rows=60, n_cols=40, true_rank=4, noise=0.1, seed=1)
    assert (noisy.X >= 0).all() and np.linalg.matrix_rank(noisy.X) > 4
    np.testing.assert_array_equal(synthetic(n_rows=5, n_cols=4, seed=3).X, synthetic(n_rows=5, n_cols=4, seed=3).X)
    with pytest.raises(ValueError, match="data.true_rank must be >= 1"):
        synthetic(true_rank=0)


def test_digits_is_sklearn_bundled_data():
    m = digits()
    assert m.X.shape == (1797, 64) and m.image_shape == (8, 8)


# ---------------------------------------------------------------- files
@pytest.fixture
def matrix():
    return np.arange(12, dtype=np.float64).reshape(4, 3)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".npz-sparse", ".csv", ".tsv", ".mtx", ".pt", ".pt-sparse"])
def test_file_formats_load_with_the_right_shape_and_values(tmp_path, matrix, suffix):
    path = tmp_path / ("x" + suffix.split("-")[0])
    if suffix == ".npy":
        np.save(path, matrix)
    elif suffix == ".npz":
        np.savez(path, X=matrix)
    elif suffix == ".npz-sparse":
        sp.save_npz(path, sp.csr_matrix(matrix))
    elif suffix in (".csv", ".tsv"):
        np.savetxt(path, matrix, delimiter="," if suffix == ".csv" else "\t")
    elif suffix == ".mtx":
        scipy.io.mmwrite(str(path), sp.coo_matrix(matrix))
    elif suffix == ".pt":
        torch.save(torch.from_numpy(matrix), path)
    elif suffix == ".pt-sparse":
        torch.save(torch.from_numpy(matrix).to_sparse(), path)
    X = materialize(from_file(str(path)).X)  # .npy stays on disk until read
    assert X.shape == (4, 3)
    dense = X.toarray() if sp.issparse(X) else X
    np.testing.assert_allclose(dense, matrix)
    assert sp.issparse(X) == suffix.endswith("sparse") or suffix == ".mtx"


def test_csv_empty_cells_are_missing_and_headers_are_caught(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b,c\n1,,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"data.skip_header=1"):
        from_file(str(path))
    X = from_file(str(path), skip_header=1).X
    assert X.shape == (2, 3) and np.isnan(X[0, 1]) and X[1, 2] == 6


def test_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown extension '.xls'.*supported: .npy"):
        from_file(str(tmp_path / "x.xls"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_file(str(tmp_path / "missing.npy"))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"could not read data.path=.*bad.npy"):
        from_file(str(bad))
    multi = tmp_path / "multi.npz"
    np.savez(multi, A=np.ones((2, 2)), B=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"data.key=NAME"):
        from_file(str(multi))
    assert from_file(str(multi), key="B").X.shape == (2, 2)
    with pytest.raises(ValueError, match=r"is a folder; give the matrix file in it"):
        from_file(str(tmp_path))
    (tmp_path / "binary.csv").write_bytes(np.ones(4).tobytes() + b"\x93")
    with pytest.raises(ValueError, match=r"binary.csv' as .csv: it is not UTF-8 text"):
        from_file(str(tmp_path / "binary.csv"))
    (tmp_path / "excel.csv").write_bytes("\ufeff1,2\n3,4\n".encode())  # Excel's "CSV UTF-8" starts with a BOM
    assert from_file(str(tmp_path / "excel.csv")).X.tolist() == [[1, 2], [3, 4]]
    (tmp_path / "typo.csv").write_text("1,2,3\n4,5;6,7\n")  # one bad cell is a bad cell, not a separator
    with pytest.raises(ValueError, match=r"line 2, column 2 holds '5;6', which is not a number"):
        from_file(str(tmp_path / "typo.csv"))
    (tmp_path / "commas.txt").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"separated by ',': set \"data.delimiter=','\""):
        from_file(str(tmp_path / "commas.txt"))
    assert from_file(str(tmp_path / "commas.txt"), delimiter=",").X.shape == (2, 3)


# ------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("X", "message"),
    [
        (
            np.array([[1.0, 2.0], [-0.5, 3.0]]),
            r"X has 1 negative entries \(min -0.5, the first at row 1, column 0\); NMF needs X >= 0",
        ),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), r"X has 1 infinite entries"),
        (np.array([[1.0, -np.inf]]), r"X has 1 infinite entries"),
        (np.zeros((0, 3)), r"X is empty \(shape \(0, 3\)\)"),
        (np.ones(5), r"X must be a 2-D matrix, got 1-D"),
        (np.full((2, 2), np.nan), r"X has no observed entries: all 4 are missing"),
        (sp.csr_matrix(np.array([[1.0, -2.0]])), r"X has 1 negative entries \(min -2, the first at row 0, column 1\)"),
        (sp.csr_matrix(np.array([[1.0, np.nan]])), r"sparse and holds 1 NaN entries"),
    ],
)
def test_bad_matrices_are_rejected_with_a_clear_message(X, message):
    with pytest.raises(NMFInputError, match=message):
        check_matrix(X)


def test_datamodule_checks_x_at_setup():
    dm = NMFDataModule(loader=lambda: type(toy())(np.array([[1.0, -1.0]])))
    with pytest.raises(NMFInputError, match="negative entries"):
        dm.setup("fit")


# ------------------------------------------------------------ newsgroups
def _post(group: str, i: int) -> bytes:
    body = " ".join(WORDS[group].split()[i % 5 :] + WORDS[group].split()[: i % 5])
    header = f"From: user{i}@example.com\nSubject: post {i}\nOrganization: none\n\n"
    text = f"{header}{body} caf\xe9 {i}\n\n-- \nsig {i}\n"
    return text.encode("latin1")


@pytest.fixture
def corpus(tmp_path):
    """A tiny 20news-bydate tree and its .tar.gz, laid out like the original archive."""
    root = tmp_path / "extract"
    for split, n in (("20news-bydate-train", 6), ("20news-bydate-test", 3)):
        for group in GROUPS:
            folder = root / split / group
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / str(1000 + 7 * i)).write_bytes(_post(group, i))
    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("20news-bydate-test", "20news-bydate-train"):
            tar.add(root / split, arcname=split)
    return root, archive


def _write_fetcher_cache(root, data_home):
    from sklearn.datasets import load_files

    cache = {
        "train": load_files(root / "20news-bydate-train", encoding="latin1"),
        "test": load_files(root / "20news-bydate-test", encoding="latin1"),
    }
    data_home.mkdir()
    (data_home / "20news-bydate_py3.pkz").write_bytes(codecs.encode(pickle.dumps(cache), "zlib_codec"))


@pytest.mark.parametrize("subset", ["train", "test", "all"])
def test_archive_gives_exactly_what_the_fetcher_gives(corpus, tmp_path, subset):
    root, archive = corpus
    _write_fetcher_cache(root, tmp_path / "sk")
    cats = ["sci.space", "alt.atheism", "comp.graphics"]
    from_archive = load_documents(cats, subset, archive=str(archive))
    from_fetcher = load_documents(cats, subset, data_home=str(tmp_path / "sk"))
    assert from_archive == from_fetcher
    texts, names = from_archive
    assert names == ["alt.atheism", "comp.graphics", "sci.space"]
    assert all("From:" not in t and "sig" not in t for t in texts)  # headers and footers removed


def test_newsgroups_tfidf_shape_and_vocabulary(corpus):
    _, archive = corpus
    m = newsgroups(archive=str(archive))
    assert m.X.shape[0] == 24 and sp.issparse(m.X)
    assert m.X.shape[1] == len(m.col_names)
    assert "orbit" in m.col_names and "the" not in m.col_names  # English stop words dropped
    all_groups = newsgroups(categories=None, archive=str(archive), vectorizer={"max_features": 5})
    assert all_groups.X.shape == (24, 5)
    counts = newsgroups(archive=str(archive), weighting="counts")
    assert counts.col_names == m.col_names and counts.X.nnz == m.X.nnz
    assert (counts.X.data == np.round(counts.X.data)).all() and counts.X.data.min() >= 1  # word counts


def test_newsgroups_errors_name_the_problem(corpus, tmp_path):
    _, archive = corpus
    with pytest.raises(ValueError, match=r"unknown groups \['sci.nope'\]"):
        newsgroups(categories=["sci.nope"], archive=str(archive))
    with pytest.raises(FileNotFoundError, match="data.archive=.*does not exist"):
        newsgroups(archive=str(tmp_path / "nope.tar.gz"))
    with pytest.raises(ValueError, match="data.subset='dev'"):
        newsgroups(subset="dev", archive=str(archive))
    with pytest.raises(ValueError, match="data.weighting='bm25' is not one of"):
        newsgroups(weighting="bm25", archive=str(archive))


def test_newsgroups_offline_without_an_archive_names_data_archive(tmp_path, monkeypatch):
    import urllib.error

    import sklearn.datasets

    def offline(**_):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sklearn.datasets, "fetch_20newsgroups", offline)
    with pytest.raises(ValueError, match=r"could not download 20 newsgroups .* data.archive=PATH/20news-bydate"):
        newsgroups(data_home=str(tmp_path))


def test_a_text_cell_that_is_not_a_number_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("# a comment\n1,2,3\n\n4,abc,6 # inline\n7,,NA\n")
    with pytest.raises(ValueError, match=r"line 4, column 2 holds 'abc', which is not a number.*data.na_values"):
        from_file(str(path))
    X = from_file(str(path), na_values=["", "NA", "abc"]).X  # listed: read as missing entries
    assert np.isnan(X).sum() == 3 and X[0].tolist() == [1, 2, 3]


def test_broken_and_unsafe_files_are_errors_that_say_what_the_file_must_hold(tmp_path):
    import collections

    good = tmp_path / "x.npz"
    np.savez(good, X=np.ones((5, 4)))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"data.path=.*cut.npz.* is not a whole .npz archive .*: it is cut short"):
        from_file(str(tmp_path / "cut.npz"))
    (tmp_path / "text.npz").write_text("a,b\n1,2\n")  # not numpy's (read as a pickle, it asked for allow_pickle)
    with pytest.raises(ValueError, match=r"text.npz.* is not a whole .npz archive"):
        from_file(str(tmp_path / "text.npz"))
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npy.* is empty \(0 bytes\): it holds no matrix"):
        from_file(str(tmp_path / "empty.npy"))
    torch.save(collections.OrderedDict(X=np.ones((5, 4))), tmp_path / "numpy.pt")
    with pytest.raises(ValueError, match=r"must hold a tensor .* other Python objects, which are not loaded") as err:
        from_file(str(tmp_path / "numpy.pt"), key="X")
    assert "weights_only" not in str(err.value)


def test_a_file_too_large_to_load_whole_is_refused_from_its_header(tmp_path, monkeypatch):
    from nmf_lightning import validation

    np.save(tmp_path / "x.npy", np.ones((100, 50)))
    monkeypatch.setattr(validation, "available_memory", lambda: 10_000)  # bytes
    dm = NMFDataModule(loader=from_file, path=str(tmp_path / "x.npy"))
    with pytest.raises(ValueError, match=r"needs about .* GiB to load whole .* data.batch_rows=\d+"):
        dm.setup("fit")
    streamed = NMFDataModule(loader=from_file, path=str(tmp_path / "x.npy"), batch_rows=10)
    streamed.setup("fit")  # a streamed X is never held whole: no such limit


def test_triplet_text_files_read_as_the_sparse_matrix_of_their_ids(tmp_path):
    """(row id, column id, value) lines, as MovieLens's u.data: ids are labels, extra columns are ignored."""
    lines = ["user\titem\trating\ttime", "10\t7\t4\t1", "3\t7\t5\t2", "10\t2\t1\t3", "3\t9\t2\t4"]
    (tmp_path / "r.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "u.data").write_text("\n".join(lines[1:]) + "\n")  # MovieLens: no extension we know, tabs
    assert (
        from_file(str(tmp_path / "u.data"), layout="triplets").X
        != from_file(str(tmp_path / "r.tsv"), layout="triplets", skip_header=1).X
    ).nnz == 0
    m = from_file(str(tmp_path / "r.tsv"), layout="triplets", skip_header=1, unstored="missing")
    assert m.unstored_missing and m.col_names == ["2", "7", "9"]  # columns in numeric order of the ids
    np.testing.assert_array_equal(m.X.toarray(), [[0, 5, 2], [1, 4, 0]])  # rows: users 3, 10
    (tmp_path / "names.csv").write_text("ann,x,1.5\nbob,y,2\n")
    named = from_file(str(tmp_path / "names.csv"), layout="triplets")
    assert named.col_names == ["x", "y"] and named.X.toarray().tolist() == [[1.5, 0], [0, 2]]
    (tmp_path / "ids.csv").write_text("12345678901234567890,5,1\n007,5,2\n7,5,3\n")  # long, and padded ids
    ids = from_file(str(tmp_path / "ids.csv"), layout="triplets")
    assert ids.X.toarray().ravel().tolist() == [2, 1, 3]  # three users, as text: "007" < "1234..." < "7"
    (tmp_path / "dup.csv").write_text("1,1,3\n2,1,4\n1,1,5\n")
    with pytest.raises(ValueError, match=r"data rows 1 and 3 give the same \(row, column\) pair"):
        from_file(str(tmp_path / "dup.csv"), layout="triplets")
    (tmp_path / "bad.csv").write_text("1,1,3\n2,1,lots\n")
    with pytest.raises(ValueError, match=r"data row 2 holds the value 'lots' in its third column"):
        from_file(str(tmp_path / "bad.csv"), layout="triplets")
    with pytest.raises(ValueError, match=r"data.layout=triplets reads a text file, and data.path is a .npy file"):
        from_file(str(tmp_path / "x.npy"), layout="triplets")
    with pytest.raises(ValueError, match=r"data.layout='long' must be 'matrix' or 'triplets'"):
        from_file(str(tmp_path / "r.tsv"), layout="long")


def test_a_ratings_list_trains_from_the_command_line_config(make_cfg, tmp_path):
    from nmf_lightning.train import train

    rng = np.random.default_rng(0)
    R = rng.random((30, 3)) @ rng.random((3, 20))
    users, items = np.nonzero(rng.random(R.shape) < 0.4)
    rows = [f"{u + 100},{i + 1},{R[u, i]:.6f}" for u, i in zip(users, items, strict=True)]
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    data = ("data=file", f"data.path={tmp_path / 'ratings.csv'}", "data.layout=triplets", "data.unstored=missing")
    metrics = train(make_cfg(*data, "optimizer=mu", "model.rank=3", "data.holdout=0.1", "trainer.max_steps=200"))
    assert metrics["status"] == "completed" and metrics["val_rmse"] < 0.2
