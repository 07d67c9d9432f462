"""Ratings that recommend: biased NMF on observed entries, read from rating lists as they come."""

import numpy as np
import pytest

from nmf_lightning.data.files import from_file


def test_a_rating_list_with_a_header_line_reads_without_skip_header(tmp_path):
    """RecBole's ml-100k.inter starts with ``user_id:token item_id:token rating:float timestamp:float``."""
    rows = ["196\t242\t3\t881250949", "186\t302\t3\t891717742", "196\t302\t5\t881250950"]
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    (tmp_path / "ml.inter").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "u.data").write_text("\n".join(rows) + "\n")
    (tmp_path / "commented.tsv").write_text("\n".join(["", "# exported ratings", header, *rows]) + "\n")
    plain = from_file(str(tmp_path / "u.data"), layout="triplets", unstored="missing")
    for name in ("ml.inter", "commented.tsv"):
        headed = from_file(str(tmp_path / name), layout="triplets", unstored="missing")
        assert (headed.X != plain.X).nnz == 0 and headed.col_names == plain.col_names == ["242", "302"]
    np.testing.assert_array_equal(plain.X.toarray(), [[0, 3], [3, 5]])
    (tmp_path / "late.tsv").write_text("\n".join([header, rows[0], "186\t302\tfive\t1"]) + "\n")
    with pytest.raises(ValueError, match=r"data row 2 holds the value 'five' in its third column"):
        from_file(str(tmp_path / "late.tsv"), layout="triplets")
