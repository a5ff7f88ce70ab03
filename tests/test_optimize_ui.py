"""The AutoMBW section of the Merge tab, its handlers called as gradio calls them ({field: value} dicts), on the
standalone host with the runnable demo models: the config it writes, a run watched to its end, stop and
resume, payload files, errors shown in the section."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lib_merge.optimize.jobs import runs_for  # noqa: E402
from lib_merge.ui.autombw_tab import config_from_form, payloads_from_rows  # noqa: E402
from lib_merge.ui.tab import make_tab  # noqa: E402

SCORER = "def s(images, payloads, params):\n    return [-(params['alpha.M00'] - 0.25) ** 2] * len(images)\n"
ROW = ["a cat", "", 3, 1, 7, 64, 64, "Euler a", 1, 1, False]


@pytest.fixture
def section(previewing_host, tmp_path):
    (tmp_path / "sc.py").write_text(SCORER)
    tab = make_tab(previewing_host)
    v = tab.autombw.values()
    v.update({"model_a": "r1.safetensors", "model_b": "r2.safetensors", "am_blocks": "M00, IN0*",
              "am_groups": "LOW=IN00 IN01 IN02", "am_bounds": "M00=0:0.5", "am_trials": 4,
              "am_optimizer": "random", "am_scorer": f"python:{tmp_path / 'sc.py'}:s", "am_payloads": [ROW]})
    return tab, v


def text(html_text: str) -> str:
    import re
    return html.unescape(re.sub(r"<[^>]+>", " ", html_text))


def test_the_section_writes_the_config_optimize_run_reads(section, previewing_host):
    tab, v = section
    config = config_from_form(previewing_host, v, tab.archs)
    assert config["space"] == {"alpha": ["M00", "IN0*"], "groups": {"LOW": ["IN00", "IN01", "IN02"]},
                               "bounds": {"M00": [0.0, 0.5]}}
    assert config["recipe"]["method"] == "weighted_sum" and [m["name"] for m in config["recipe"]["models"]] == \
        ["r1.safetensors", "r2.safetensors"]
    assert config["budget"]["trials"] == 4 and config["optimizer"] == {"name": "random", "seed": 0}
    assert config["payloads"] == [{"prompt": "a cat", "seed": 3, "steps": 1, "cfg": 7.0, "width": 64, "height": 64,
                                   "sampler": "Euler a", "batch_size": 1, "weight": 1.0, "holdout": False}]
    # the tab's MBW settings are the starting point (the warm start), clipped into the bounds
    from lib_merge.engine.recipe import Recipe
    from lib_merge.optimize.space import SearchSpace
    from lib_merge.ui import form as F
    v2 = {**v, "mbw": True, F.bank_text_field(0): "M00=0.9, IN01=0.2"}
    start = config_from_form(previewing_host, v2, tab.archs)["recipe"]
    assert start["blocks"]["alpha"][13] == 0.9 and start["blocks"]["alpha"][2] == 0.2
    space = SearchSpace(config["space"], Recipe.from_dict(start), "sd1")
    point = space.start_point()
    assert point["alpha.M00"] == 0.5, "0.9 clipped to the bound 0.5"
    assert point["alpha.LOW"] == pytest.approx((0.5 + 0.2 + 0.5) / 3), "a group starts at its blocks' mean"


def test_start_watch_to_the_end_with_plots_images_and_the_best_applied(section, previewing_host):
    tab, v = section
    updates = list(tab.autombw.on_start(v))
    shown = json.loads(updates[0]["am_config"])
    assert shown["space"]["alpha"] == ["M00", "IN0*"]
    final = updates[-1]
    assert "Run done" in text(final["am_status"]) and "4 of 4 trials done" in text(final["am_status"])
    assert Path(final["am_convergence"]).is_file() and Path(final["am_blocks_plot"]).is_file()
    (path, caption), = final["am_gallery"]
    assert Path(path).is_file() and caption.startswith("trial 3: ")
    runs = runs_for(previewing_host)
    best = runs.run.best()
    assert previewing_host.loaded is not None and previewing_host.loaded.short_hash == best["recipe_hash"]
    # the run folder's config is what the section showed, resolved
    saved = json.loads((runs.run.log.folder / "config.json").read_text())
    assert saved["space"] == shown["space"] and "resolved" in saved
    # Restore, then Apply best (from the run folder)
    # the tab's current-merge line follows: the best merge after the run, nothing after the restore
    assert f"hash `{best['recipe_hash']}`" in final["current"]["value"] and final["restore"]["visible"]
    restored = tab.autombw.on_restore({})
    assert "dropped from memory" in text(restored["am_status"])
    assert restored["current"]["value"] == "No merge in memory yet." and not restored["restore"]["visible"]
    assert previewing_host.loaded is None
    applied = tab.autombw.on_apply({"am_run": runs.run.log.folder.name})
    assert "Merged" in text(applied["am_status"]) and previewing_host.loaded.short_hash == best["recipe_hash"]
    saved_best = tab.autombw.on_save_best({"am_run": "", "am_save_name": "best_of_run"})
    assert "Saved best_of_run.safetensors" in text(saved_best["am_status"])


def test_stop_then_resume_from_the_list(section, previewing_host, tmp_path):
    tab, v = section
    # a scorer slow enough that Stop lands within the run on a loaded machine (plots are drawn between trials)
    (tmp_path / "slow.py").write_text("import time\n" + SCORER.replace("    return", "    time.sleep(0.5)\n    return"))
    v = {**v, "am_trials": 6, "am_scorer": f"python:{tmp_path / 'slow.py'}:s"}
    runs = runs_for(previewing_host)
    stopped = False
    for u in tab.autombw.on_start(v):
        if not stopped and runs.run is not None and len(runs.run.records) >= 1:
            assert "Stopping" in text(tab.autombw.on_stop({})["am_status"])
            stopped = True
    assert "Run stopped" in text(u["am_status"])
    name = runs.run.log.folder.name
    assert name in tab.autombw.on_refresh_runs({})["am_run"]["choices"]
    resumed = list(tab.autombw.on_resume({"am_run": name}))
    assert "Run done" in text(resumed[-1]["am_status"]) and "6 of 6" in text(resumed[-1]["am_status"])
    assert [r["trial"] for r in runs.run.log.trials()] == list(range(6))


def test_errors_are_shown_in_the_section(section):
    tab, v = section
    first = next(tab.autombw.on_start({**v, "am_blocks": "IN04 IN99"}))
    assert "'IN99' is not a block of this sd1 model" in text(first["am_status"])
    first = next(tab.autombw.on_start({**v, "am_bounds": "M00=0.5"}))
    assert "must be NAME=LOW:HIGH" in text(first["am_status"])
    first = next(tab.autombw.on_start({**v, "am_payloads": [["a cat", "", "many"]]}))
    assert "row 1: seed must be a number, not 'many'" in text(first["am_status"])
    first = next(tab.autombw.on_start({**v, "model_b": None}))
    assert "merge-lab-error" in first["am_status"]
    assert "No run" in text(tab.autombw.on_stop({})["am_status"])
    rated = tab.autombw.on_rate({"am_ratings": "7, x"})
    assert "Ratings must be numbers" in text(rated["am_status"])


def test_payload_table_saves_and_loads_files(section, previewing_host, tmp_path):
    tab, v = section
    rows = [ROW, ["a dog", "ugly", -1, 20, 5.5, 512, 768, "Euler", 2, 0.5, True]]
    saved = tab.autombw.on_save_payloads({"am_payloads": rows, "am_payload_name": "mine.yaml"})
    path = Path(previewing_host.output_dir()) / "autombw" / "mine.yaml"
    assert f"Saved 2 payload(s) to {path}" in text(saved["am_status"]) and path.is_file()
    loaded = tab.autombw.on_load_payloads({"am_payload_file": [str(path)]})
    assert payloads_from_rows(loaded["am_payloads"]) == payloads_from_rows(rows)
    (tmp_path / "bad.yaml").write_text("- prompt: x\n  steps: lots\n")
    bad = tab.autombw.on_load_payloads({"am_payload_file": [str(tmp_path / "bad.yaml")]})
    assert "merge-lab-error" in bad["am_status"] and "steps" in text(bad["am_status"])
