import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nmf_lightning.data import from_file
from nmf_lightning.pictures import component_grid, heatmap, reduce_to, top_words, topics_markdown
from nmf_lightning.train import train


def test_heatmap_reduces_large_factors_by_block_maxima_and_stretches_thin_ones():
    A = torch.zeros(5000, 8)
    A[1234, 3] = 7.0  # one spike must survive the reduction
    small = reduce_to(A, max_side=100)
    assert small.shape == (100, 8) and small.max() == 7.0
    image = heatmap(A, max_side=100, title="W")
    # 100 x 8 stretched to 200 x 256 (every row and column shows), a title above, a colour bar and its numbers
    assert image.dtype == np.uint8 and image.shape == (200 + 20, 256 + 8 + 16 + 64, 3)
    bar = image[20:, 256 + 8 + 8]
    assert len(np.unique(bar, axis=0)) > 50 and (bar[0] != bar[-1]).any()  # a colour scale from the top value to 0


def test_component_grid_tiles_each_component_as_an_image():
    H = torch.rand(10, 64)
    grid = component_grid(H, (8, 8))
    # 10 components -> 4 x 3 grid of 8x8 images with 1-pixel gaps, zoomed 8x
    assert grid.shape == ((3 * 9 + 1) * 8, (4 * 9 + 1) * 8, 3)
    many = component_grid(torch.rand(100, 64), (8, 8))  # 10 x 10 images: zoomed less, to fit a card
    assert max(many.shape[:2]) <= 400 and many.shape[0] == (10 * 9 + 1) * 4


def test_top_words_pick_the_heaviest_columns_of_each_component():
    H = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0]])
    names = ["a", "b", "c", "d"]
    assert top_words(H, names, 2) == [["b", "d"], ["a", "d"]]
    assert "| 1 | 6 | a d b |" in topics_markdown(H, names, 3)


def _tags(run):
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_digits_run_logs_heatmaps_and_components_as_images(make_cfg, tmp_path):
    train(
        make_cfg(
            "data=digits",
            "model.rank=6",
            "trainer.max_steps=40",
            "model.inner_steps=10",
            "callbacks.factor_pictures.every_n_steps=20",
        )
    )
    ea = _tags(tmp_path)
    assert {"factors/W", "factors/H", "components/H"} <= set(ea.Tags()["images"])
    assert [e.step for e in ea.Images("components/H")] == [20, 40, 40]  # every 20 updates and the end
    assert not (tmp_path / "topics.md").exists()  # digits has no vocabulary


def test_text_data_logs_topics_to_tensorboard_and_topics_md(make_cfg, tmp_path):
    rng = np.random.default_rng(0)
    H = np.kron(np.eye(3), np.ones((1, 5)))  # 3 topics of 5 words each
    np.save(tmp_path / "docs.npy", rng.random((40, 3)) @ H)
    (tmp_path / "vocab.txt").write_text("\n".join(f"word{i}" for i in range(15)))
    train(
        make_cfg(
            "data=file",
            f"data.path={tmp_path / 'docs.npy'}",
            f"data.col_names={tmp_path / 'vocab.txt'}",
            "model.rank=3",
            "optimizer=hals",
            "trainer.max_steps=200",
            "callbacks.factor_pictures.n_words=5",
        )
    )
    ea = _tags(tmp_path)
    assert "topics/text_summary" in ea.Tags()["tensors"]
    text = ea.Tensors("topics/text_summary")[-1].tensor_proto.string_val[0].decode()
    topics = (tmp_path / "topics.md").read_text()
    assert text in topics
    found = {frozenset(line.split("|")[3].split()) for line in topics.splitlines()[4:]}
    assert found == {frozenset(f"word{i}" for i in range(t * 5, t * 5 + 5)) for t in range(3)}


def test_column_names_and_image_shape_must_fit_x(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 6)))
    (tmp_path / "v.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="lists 2 names but X has 6 columns"):
        from_file(str(tmp_path / "x.npy"), col_names=str(tmp_path / "v.txt"))
    with pytest.raises(ValueError, match="holds 4 pixels but X has 6 columns"):
        from_file(str(tmp_path / "x.npy"), image_shape=[2, 2])
    assert from_file(str(tmp_path / "x.npy"), image_shape=[2, 3]).image_shape == (2, 3)
