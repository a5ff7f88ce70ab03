"""XY plot: one merge per distinct recipe, labelled grids, PNGs with infotext, readable errors."""
import numpy as np
import pytest
from PIL import Image

from lib_merge import session, xy
from lib_merge.core.errors import InputError, MergeError
from lib_merge.core.generation import GenerationRequest
from lib_merge.core.weights import preset
from lib_merge.host.standalone import StandaloneHost
from lib_merge.xy import Axis, run_xy

MODELS = ["r1.safetensors", "r2.safetensors"]
REQUEST = GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=5)


@pytest.fixture
def host(previewing_host):
    return previewing_host


@pytest.fixture
def merges(monkeypatch):
    """The recipes merged into memory, in order (session.merge_to_memory wrapped)."""
    done = []
    real = session.merge_to_memory

    def counting(host, recipe, **kw):
        done.append(recipe)
        return real(host, recipe, **kw)
    monkeypatch.setattr(session, "merge_to_memory", counting)
    return done


def base(host, alpha=0.5):
    return session.recipe_from_names(host, "weighted_sum", MODELS, params={"alpha": alpha})


def test_alpha_by_preset_merges_each_recipe_once(host, merges):
    progress = []
    r = run_xy(host, base(host), Axis("alpha", "0.2, 0.5, 0.8"), Axis("preset", "GRAD_V, GRAD_A"), REQUEST,
               progress=lambda f, t: progress.append((f, t)))
    assert r.merges_done == 6 and len(merges) == 6
    assert len({m.public_json() for m in merges}) == 6, "each distinct recipe merged exactly once"
    assert r.x_labels == ["α = 0.2", "α = 0.5", "α = 0.8"] and r.y_labels == ["GRAD_V", "GRAD_A"]
    assert r.labels == ["α = 0.2 | GRAD_V", "α = 0.5 | GRAD_V", "α = 0.8 | GRAD_V",
                        "α = 0.2 | GRAD_A", "α = 0.5 | GRAD_A", "α = 0.8 | GRAD_A"]
    # the preset at the cell's α: GRAD_A at α = 0.8 is GRAD_A times 0.8
    cell = r.recipes[5]
    assert cell.params["alpha"] == 0.8
    assert cell.blocks["alpha"] == pytest.approx([0.8 * v for v in preset("GRAD_A", "sd1")])
    assert len(r.images) == 6 and all(im.size == (64, 64) for im in r.images)
    arrays = [np.array(im) for im in r.images]
    assert not np.array_equal(arrays[0], arrays[2]), "different α, different image"
    assert not np.array_equal(arrays[1], arrays[4]), "different preset, different image"
    # grid: 3 columns x 2 rows of 64 px cells, plus the label margins (left for rows, top for columns)
    left, top = r.margins
    assert left > 0 and top > 0 and r.cell_size == (64, 64)
    assert r.grid_image.size == (left + 3 * 64, top + 2 * 64)
    # the grid's cells are the images, in place
    g = np.array(r.grid_image)
    assert np.array_equal(g[top + 64:top + 128, left + 128:left + 192], arrays[5])
    # saved: every image and the grid, PNGs with the infotext in the "parameters" chunk
    assert r.folder.parent == host.output_dir() / "xy" and r.grid_path.is_file()
    assert len(r.paths) == 6 and all(p.is_file() for p in r.paths)
    with Image.open(r.paths[5]) as im:
        info = im.text["parameters"]
    assert "Seed: 5" in info and "Merge Lab recipe:" in info
    from lib_merge.ui.form import parse_recipe_text
    assert parse_recipe_text(info).params["alpha"] == 0.8, "the image's infotext holds its cell's recipe"
    assert info == r.infotexts[5]
    with Image.open(r.grid_path) as im:
        assert im.size == r.grid_image.size and "parameters" in im.text and "merge_lab_xy" in im.text
    assert progress[-1][0] == 1.0 and any("Merging" in t for _, t in progress)


def test_seed_axis_does_not_remerge(host, merges):
    r = run_xy(host, base(host), Axis("alpha", [0.3, 0.7]), Axis("seed", "1, 2, 3"), REQUEST)
    assert r.merges_done == 2 and len(merges) == 2, "one merge per α value, not per seed"
    assert [m.params["alpha"] for m in merges] == [0.3, 0.7]
    assert r.y_labels == ["seed 1", "seed 2", "seed 3"]
    assert r.labels[3] == "α = 0.7 | seed 2"
    assert "Seed: 2" in r.infotexts[2] and "Seed: 3" in r.infotexts[4]
    a = [np.array(im) for im in r.images]
    assert not np.array_equal(a[0], a[2]), "another seed, another image"
    # a single axis: one row, no left margin
    one = run_xy(host, base(host), Axis("seed", "1-2"), None, REQUEST)
    assert one.merges_done == 1 and one.margins[0] == 0
    assert one.grid_image.size == (2 * 64, one.margins[1] + 64)


def test_saves_models_and_other_axes(host, merges):
    r = run_xy(host, base(host), Axis("param:alpha", "0-1 (2)"), None, REQUEST, save_models=True)
    assert r.x_labels == ["α = 0", "α = 1"] and len(r.saved_models) == 2
    assert all(p.is_file() and p.parent == host.output_dir() for p in r.saved_models)
    assert "alpha_0" in r.saved_models[0].name and " " not in r.saved_models[0].name
    recipes = [base(host, 0.1).to_json(), base(host, 0.9).to_json()]
    r2 = run_xy(host, base(host), Axis("recipe", "[" + ",".join(recipes) + "]"), None, REQUEST)
    assert r2.merges_done == 2 and r2.x_labels[0].startswith("#1 weighted_sum(r1, r2)")


def test_bad_axes_say_what_is_wrong(host, merges):
    with pytest.raises(MergeError, match="unknown axis kind 'gamma'"):
        Axis("gamma", "1, 2")
    with pytest.raises(MergeError, match="unknown block-weight preset"):
        Axis("preset", "GRAD_Q")
    with pytest.raises(MergeError, match="has no values"):
        Axis("alpha", " , ")
    with pytest.raises(MergeError, match="outside its range"):
        run_xy(host, base(host), Axis("alpha", "0.5, 7"), None, REQUEST)
    with pytest.raises(MergeError, match="has no parameter 'density'"):
        run_xy(host, base(host), Axis("param:density", "0.5"), None, REQUEST)
    with pytest.raises(MergeError, match="both set"):
        run_xy(host, base(host), Axis("alpha", "0.5"), Axis("param:alpha", "0.2"), REQUEST)
    assert merges == [], "nothing is merged before every cell is checked"


def test_host_that_cannot_generate(runnable_models, tmp_path, merges):
    host = StandaloneHost(runnable_models, tmp_path / "out", generate=False)
    with pytest.raises(MergeError, match="cannot generate"):
        run_xy(host, base(host), Axis("alpha", "0.2, 0.8"), None, REQUEST)
    assert merges == []


def test_cancel_stops_between_cells(host, merges):
    with pytest.raises(MergeError, match="interrupted after 0 of 2 cells"):
        run_xy(host, base(host), Axis("alpha", "0.2, 0.8"), None, REQUEST, cancel=lambda: True)
    assert merges == []


def test_labels_and_names_are_readable():
    assert xy.fmt_value(0.1 + 0.2) == "0.3" and xy.fmt_value(1.0) == "1" and xy.fmt_value(True) == "on"
    assert Axis("alpha", "0-1 (5)").values == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert Axis("seed", "3-1").values == [3, 2, 1]
    assert Axis("method", "Weighted sum, add_difference").values == ["weighted_sum", "add_difference"]
    assert xy._sanitise("α = 0.2 | GRAD_V / ../x") == "alpha_0.2_GRAD_V_._x"


def test_grid_labels_with_the_bitmap_font_of_old_pillow(monkeypatch):
    """The WebUI's Pillow 9.5 has no scalable default font, and its bitmap font has no getmetrics: the grid
    is still drawn, the labels above and beside the cells."""
    from PIL import Image, ImageFont
    monkeypatch.setattr(xy, "_font", lambda cell_w, font_file=None: ImageFont.load_default_imagefont())
    cells = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "white")]
    grid, (left, top), size = xy.compose_grid(cells, ["x = 0", "x = 1"], ["y = 0", "y = 1"])
    assert size == (64, 64) and top > 8 and left > 20
    assert grid.size == (left + 128, top + 128)
    assert grid.getpixel((left + 5, top + 5)) == (255, 0, 0) and grid.getpixel((left + 70, top + 70)) == (255, 255, 255)
    labels = grid.crop((0, 0, left + 128, top)).convert("L")
    assert labels.getextrema()[0] < 100        # some dark label pixels were drawn on the white margin


def test_grid_uses_the_hosts_font_file(tmp_path):
    from PIL import Image
    cells = [Image.new("RGB", (320, 320), "white")]
    small, (_, top_default), _ = xy.compose_grid(cells, ["a label"], [], font_file=str(tmp_path / "missing.ttf"))
    assert top_default > 0    # a missing font file falls back to the system's or Pillow's


# ---------------------------------------------------------------------------------------------- the tab
def _tab_values(tab, **more):
    v = tab.values()
    v.update(model_a=MODELS[0], model_b=MODELS[1], prompt="a cat", steps=2, width=64, height=64, gen_seed=5)
    v.update(more)
    return v


def test_tab_runs_the_plot_and_streams_status(host, merges):
    from lib_merge.ui.tab import make_tab
    tab = make_tab(host)
    assert tab.c["xy_run"].visible is True
    v = _tab_values(tab, xy_x_kind="alpha", xy_x_values="0.3, 0.6", xy_y_kind="seed", xy_y_values="1, 2")
    updates = list(tab.on_xy(v))
    last = updates[-1]
    assert "merge-lab-ok" in last["xy_status"] and "4 image(s) from 2 merge(s)" in last["xy_status"], last
    gallery = last["xy_gallery"]["value"]
    assert len(gallery) == 5 and gallery[0][1] == "grid" and gallery[1][1] == "α = 0.3 | seed 1"
    assert len(merges) == 2
    # a bad axis: a sentence in the XY status line, nothing merged
    bad = list(tab.on_xy(_tab_values(tab, xy_x_kind="gamma", xy_x_values="1")))
    assert len(bad) == 1 and "merge-lab-error" in bad[0]["xy_status"] and "unknown axis kind" in bad[0]["xy_status"]
    assert len(merges) == 2


def test_tab_without_previews_hides_the_run_button(runnable_models, tmp_path):
    from lib_merge.ui.tab import make_tab
    host = StandaloneHost(runnable_models, tmp_path / "out", generate=False)
    tab = make_tab(host)
    assert tab.c["xy_run"].visible is False
    u = list(tab.on_xy(_tab_values(tab)))
    assert "cannot generate" in u[-1]["xy_status"]


def test_model_swap_prompt_replace_one_block_and_a_z_axis(previewing_host, tmp_path):
    """model:B swaps B among checkpoints, block:IN04 changes only that block, prompt replaces text without
    re-merging, and a Z axis makes one grid per value; every cell's recipe and request as asked."""
    from lib_merge import xy
    from lib_merge.core.generation import GenerationRequest
    from lib_merge.session import recipe_from_names
    host = previewing_host
    base = recipe_from_names(host, "weighted_sum", ["r1.safetensors", "r2.safetensors"], params={"alpha": 0.5})
    request = GenerationRequest(prompt="a cat on a mat", steps=1, width=64, height=64, seed=3)
    x = xy.Axis("block:IN04", "0, 1")
    y = xy.Axis("prompt", "cat, dog")
    z = xy.Axis("model:B", "r2.safetensors, r1.safetensors")
    cells = xy.plan_cells(host, base, x, y, request)
    assert [c.request.prompt for c in cells] == ["a cat on a mat"] * 2 + ["a dog on a mat"] * 2
    blocks = [c.recipe.blocks["alpha"] for c in cells[:2]]
    assert blocks[0][5] == 0 and blocks[1][5] == 1 and blocks[0][:5] == [0.5] * 5 and blocks[1][6:] == [0.5] * 20
    result = xy.run_xy(host, base, x, y, request, z=z)
    assert len(result.grids) == 2 and [label for _, label in result.grids] == ["B = r2", "B = r1"]
    assert len(result.images) == 8 and result.merges_done == 4     # the prompt axis shares each merge
    assert [m.name for m in result.recipes[-1].models] == ["r1.safetensors", "r1.safetensors"]
    assert result.labels[0] == "IN04 = 0 | cat | B = r2"
    with pytest.raises(InputError, match="the prompt does not contain 'horse'"):
        xy.plan_cells(host, base, x, xy.Axis("prompt", "horse, dog"), request)
    with pytest.raises(InputError, match="the Z axis sets IN04, as another axis does"):
        xy.run_xy(host, base, x, y, request, z=xy.Axis("block:IN04", "0.3"))
    with pytest.raises(InputError, match="'IN99' is not a block"):
        xy.Axis("block:IN99", "1")
