"""AutoMBW: the loop on the standalone host with the runnable demo models (real merges, real diffusers
generation), plug-in scorers with known optima, the run folder, resume after kill -9, holdout, early stop,
failures, and every validation message."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lib_merge.core.errors import InputError
from lib_merge.optimize.config import check_config
from lib_merge.optimize.jobs import execute
from lib_merge.optimize.optimizers import Dimension, make_optimizer
from lib_merge.optimize.runlog import RunLog
from lib_merge.optimize.runner import Run, start_run
from lib_merge.optimize.scorers import Standardiser, aggregate, check_scorer_spec, per_image_scores

ROOT = Path(__file__).resolve().parents[1]
TARGET = {"alpha.IN04": 0.3, "alpha.M00": 0.8, "alpha.OUT03": 0.6}
PAYLOAD = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 1}

SCORER = f"""
import math
TARGET = {TARGET!r}
calls = []

def quadratic(images, payloads, params):
    # the known optimum: the score is highest (0) at TARGET, whatever the images show
    return [-sum((params[k] - v) ** 2 for k, v in TARGET.items())] * len(images)

def flat(images, payloads, params):
    return [1.0] * len(images)

def picky(images, payloads, params):
    if params["alpha.M00"] > 0.5:
        raise RuntimeError("the scorer broke")
    return [math.nan if params["alpha.IN04"] > 0.5 else params["alpha.IN04"]] * len(images)

def brightness(images, payloads, params):
    return [sum(im.convert("L").getdata()) / (255.0 * im.width * im.height) for im in images]
"""


@pytest.fixture
def workdir(tmp_path, runnable_models):
    (tmp_path / "scorers.py").write_text(SCORER)
    return tmp_path


def config(**over) -> dict:
    base = {"name": "test", "models": ["r1.safetensors", "r2.safetensors"], "params": {"alpha": 0.5},
            "space": {"alpha": ["IN04", "M00", "OUT03"]}, "optimizer": {"name": "bayes", "seed": 3, "init_points": 5},
            "budget": {"trials": 6}, "payloads": [PAYLOAD], "scorer": "python:scorers:quadratic"}
    base.update(over)
    return base


def run_here(host, workdir, cfg) -> tuple[Run, dict]:
    log = start_run(cfg, host, root=workdir / "runs", base_dir=workdir)
    holder = {}
    result = execute(log, host=host, echo=lambda line: None, on_run=lambda r: holder.setdefault("run", r))
    return holder["run"], result


def best_distance(run: Run) -> float:
    best = run.best()
    return math.sqrt(sum((best["params"][k] - v) ** 2 for k, v in TARGET.items()))


def test_bayes_reaches_a_known_optimum_and_random_search_does_worse(previewing_host, workdir):
    budget = {"trials": 22}
    bayes, _ = run_here(previewing_host, workdir, config(budget=budget, warm_start=False, optimizer={
        "name": "bayes", "seed": 3, "init_points": 6, "acquisition": "ei", "xi": 0.0}))
    random, _ = run_here(previewing_host, workdir, config(budget=budget, warm_start=False,
                                                          optimizer={"name": "random", "seed": 3}))
    # stated tolerance: within 0.12 (Euclidean, 3 dimensions in [0, 1]) of the optimum in 22 trials
    assert best_distance(bayes) < 0.12, bayes.best()
    assert best_distance(random) > best_distance(bayes)
    assert bayes.best()["score"] > random.best()["score"]
    assert len(bayes.records) == 22 and [r["trial"] for r in bayes.records] == list(range(22))


def test_run_folder_log_best_images_and_plots(previewing_host, workdir):
    run, result = run_here(previewing_host, workdir, config(scorer="python:scorers:brightness", budget={"trials": 4}))
    folder = run.log.folder
    assert result["state"] == "done" and folder.parent == workdir / "runs"
    lines = (folder / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 4
    rows = [json.loads(line) for line in lines]
    assert rows[0]["params"] == {"alpha.IN04": 0.5, "alpha.M00": 0.5, "alpha.OUT03": 0.5}, "warm start: trial 0 = start"
    for r in rows:
        assert set(r["params"]) == set(TARGET)
        assert r["status"] == "ok" and r["score"] == pytest.approx(r["scores"][0])
        assert set(r["seconds"]) == {"merge", "generate", "score", "suggest"}
        from PIL import Image
        image = Image.open(folder / r["images"][0])
        assert image.size == (64, 64) and "Merge Lab recipe:" in image.info["parameters"]
        expected = sum(image.convert("L").getdata()) / (255.0 * 64 * 64)
        assert r["score"] == pytest.approx(expected), "the logged score is the scorer's value of the saved image"
    best = json.loads((folder / "best.json").read_text())
    top = max(rows, key=lambda r: r["score"])
    assert best["trial"] == top["trial"] and best["score"] == top["score"]
    blocks = best["recipe"]["blocks"]["alpha"]
    assert blocks[5] == best["params"]["alpha.IN04"] and blocks[13] == best["params"]["alpha.M00"]
    assert blocks[17] == best["params"]["alpha.OUT03"] and blocks[0] == 0.5, "unsearched blocks keep the start"
    config_saved = json.loads((folder / "config.json").read_text())
    assert config_saved["resolved"]["payloads"][0]["seed"] == 1
    assert (folder / "convergence.png").stat().st_size > 1000 and (folder / "blocks.png").stat().st_size > 1000
    assert json.loads((folder / "state.json").read_text())["state"] == "done"
    # at the end the best recipe is in the live model (finish: apply)
    assert previewing_host.loaded.short_hash == best["recipe_hash"]


def test_the_same_merge_scores_the_same(previewing_host, workdir):
    """Trial 0 (the start) and a trial at the very same point give identical images and scores."""
    cfg = config(scorer="python:scorers:brightness", budget={"trials": 2}, space={"alpha": ["IN04"]},
                 optimizer={"name": "random", "seed": 0})
    run, _ = run_here(previewing_host, workdir, cfg)
    first = run.records[0]
    params = first["params"]
    from lib_merge.optimize.trial import Evaluator
    from lib_merge.optimize.scorers import build_scorers
    scorers = build_scorers(run.config["scorer"], workdir)
    again = Evaluator(previewing_host, scorers, run.keys).evaluate(run.space.recipe_for(params), run.train, params)
    assert again.raw[run.keys[0]] == first["raw"][run.keys[0]]


def test_failed_trials_are_logged_with_their_reason_and_the_run_goes_on(previewing_host, workdir):
    cfg = config(scorer="python:scorers:picky", budget={"trials": 8}, warm_start=False,
                 optimizer={"name": "random", "seed": 1})
    run, result = run_here(previewing_host, workdir, cfg)
    assert result["state"] == "done" and len(run.records) == 8
    reasons = {r["trial"]: r["error"] for r in run.records if r["status"] == "failed"}
    for r in run.records:
        if r["params"]["alpha.M00"] > 0.5:
            assert "the scorer broke" in reasons[r["trial"]] and r["score"] is None
        elif r["params"]["alpha.IN04"] > 0.5:
            assert "not a finite number" in reasons[r["trial"]]
        else:
            assert r["status"] == "ok" and r["score"] == pytest.approx(r["params"]["alpha.IN04"])
    assert reasons, "the seed gives failures"


def test_patience_stops_early(previewing_host, workdir):
    cfg = config(scorer="python:scorers:flat", budget={"trials": 30, "patience": 3, "tolerance": 0.01})
    run, result = run_here(previewing_host, workdir, cfg)
    assert len(run.records) == 4 and result["state"] == "done"
    assert "no improvement above 0.01 in the last 3 trials" in result["reason"]


def test_holdout_scores_the_best_trials(previewing_host, workdir):
    payloads = [PAYLOAD, {**PAYLOAD, "prompt": "a dog", "seed": 7, "holdout": True}]
    cfg = config(scorer="python:scorers:brightness", payloads=payloads, budget={"trials": 4},
                 holdout={"every": 2, "top": 1})
    run, _ = run_here(previewing_host, workdir, cfg)
    holdouts = [json.loads(x) for x in (run.log.folder / "holdout.jsonl").read_text().splitlines()]
    assert [h["after"] for h in holdouts][0] == 2
    assert all(len(h["scores"]) == 1 and h["score"] is not None for h in holdouts)
    assert all(len(r["images"]) == 1 for r in run.records), "holdout payloads are not used for training"
    best = run.best()
    assert best["trial"] in {h["trial"] for h in holdouts}, "the final best was scored on the holdout"


def test_stop_between_trials_then_resume_completes(previewing_host, workdir):
    log = start_run(config(budget={"trials": 5}), previewing_host, root=workdir / "runs", base_dir=workdir)
    lines: list[str] = []
    holder = {}

    def echo(line):
        lines.append(line)
        if line.startswith("trial 1:"):
            holder["run"].stop()

    result = execute(log, host=previewing_host, echo=echo, on_run=lambda r: holder.setdefault("run", r))
    assert result["state"] == "stopped" and len(RunLog.open(log.folder).trials()) == 2
    result = execute(RunLog.open(log.folder), host=previewing_host, echo=lambda line: None)
    assert result["state"] == "done"
    assert [r["trial"] for r in RunLog.open(log.folder).trials()] == list(range(5))


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lib_merge", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_kill_9_during_a_trial_then_resume_equals_an_uninterrupted_run(workdir, runnable_models):
    cfg = config(budget={"trials": 9}, optimizer={"name": "bayes", "seed": 5, "init_points": 3})
    (workdir / "run.json").write_text(json.dumps(cfg))
    common = ["--models-dir", str(runnable_models), "--output-dir", str(workdir / "out")]
    whole = _cli(["optimize", "run", "run.json", "--run-dir", str(workdir / "whole"), *common], workdir)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out
    reference = RunLog.open(workdir / "whole").trials()

    broken = _cli(["optimize", "run", "run.json", "--run-dir", str(workdir / "broken"), *common], workdir)
    log = workdir / "broken" / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    time.sleep(0.3)   # into the next trial (merging or generating)
    broken.send_signal(signal.SIGKILL)
    broken.wait()
    done_at_kill = len(RunLog.open(workdir / "broken").trials())
    assert 4 <= done_at_kill < 9
    resumed = _cli(["optimize", "resume", str(workdir / "broken"), *common], workdir)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    trials = RunLog.open(workdir / "broken").trials()
    assert [r["trial"] for r in trials] == list(range(9)), "every trial once: none lost, none repeated"
    assert [r["params"] for r in trials] == [r["params"] for r in reference], "the same suggestions"
    assert [r["score"] for r in trials] == [r["score"] for r in reference]
    assert json.loads((workdir / "broken" / "best.json").read_text())["params"] == \
        json.loads((workdir / "whole" / "best.json").read_text())["params"]
    report = _cli(["optimize", "report", str(workdir / "broken")], workdir)
    out, _ = report.communicate(timeout=120)
    assert report.returncode == 0 and "9 trials (0 failed), state done" in out, out


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    good = json.dumps({"trial": 0, "params": {}, "score": 1.0})
    (tmp_path / "trials.jsonl").write_text(good + "\n" + '{"trial": 1, "par')
    log = RunLog.open(tmp_path)
    assert [r["trial"] for r in log.trials()] == [0]
    assert (tmp_path / "trials.jsonl").read_text() == good + "\n", "the torn line is cut off the file"


def test_cli_user_errors_exit_2_and_leave_no_run_folder(workdir, runnable_models):
    bad = config(space={"alpha": ["IN04", "IN99"]})
    (workdir / "bad.json").write_text(json.dumps(bad))
    p = _cli(["optimize", "run", "bad.json", "--models-dir", str(runnable_models), "--output-dir",
              str(workdir / "out")], workdir)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "'IN99' is not a block of this sd1 model" in out, out
    assert not (workdir / "out" / "autombw").exists() or not any((workdir / "out" / "autombw").iterdir())
    (workdir / "broken.yaml").write_text("models: [a, b\n")
    p = _cli(["optimize", "run", "broken.yaml"], workdir)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and "not valid YAML" in out and "broken.yaml" in out


# ------------------------------------------------------------------------------ validation messages
@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown field(s) colour"),
    ({"models": ["a.safetensors"]}, "models must list at least two checkpoints"),
    ({"optimizer": {"name": "genetic"}}, "optimizer.name is 'genetic': use one of bayes, random, cma"),
    ({"budget": {"trials": 0}}, "budget.trials must be at least 1"),
    ({"budget": {"trials": 2.5}}, "budget.trials must be an integer"),
    ({"budget": {"trails": 5}}, "budget: unknown field(s) trails"),
    ({"aggregate": "average"}, "aggregate is 'average': use one of mean, geometric, harmonic, median, min"),
    ({"finish": "keep"}, "finish is 'keep'"),
    ({"payloads": []}, "payloads must be a non-empty list"),
    ({"scorer": "clip"}, "unknown scorer 'clip'"),
    ({"scorer": "python:scorers"}, "must be python:MODULE:FUNCTION"),
    ({"scorer": [{"name": "imagereward", "weight": 0}]}, "weight must be a positive number"),
    ({"scorer": {"name": "imagereward", "sigmoid": "yes"}}, "sigmoid must be true or false"),
    ({"scorer": {"name": "imagereward", "colour": 1}}, "unknown option(s) colour"),
    ({"holdout": {"every": -1}}, "holdout.every must be at least 0"),
])
def test_config_errors(change, message):
    with pytest.raises(InputError) as e:
        check_config({**config(), **change}, "my.json")
    assert message in str(e.value) and str(e.value).startswith("my.json: ")


@pytest.mark.parametrize("space, message", [
    ({"alpha": ["IN04", "IN99"]}, "'IN99' is not a block of this sd1 model"),
    ({"gamma": "all"}, "'gamma' is not a per-block parameter of weighted_sum (per-block: alpha"),
    ({"alpha": ["IN04"], "bounds": {"IN04": [0.8, 0.2]}}, "low must be below high"),
    ({"alpha": ["IN04"], "bounds": {"M00": [0, 1]}}, "space.bounds: M00 is not searched"),
    ({"alpha": ["IN04"], "params": {"beta": [0, 1]}}, "Method 'weighted_sum' has no parameter 'beta'"),
    ({"alpha": "all", "groups": {"G": ["IN00", "IN01"], "H": ["IN01"]}}, "block IN01 is in both 'G' and 'H'"),
    ({"alpha": "all", "groups": {"M00": ["IN00"]}}, "'M00' is a block's name"),
    ({"alpha": []}, "nothing to search"),
])
def test_space_errors(previewing_host, workdir, space, message):
    with pytest.raises(InputError) as e:
        start_run(config(space=space), previewing_host, root=workdir / "runs", base_dir=workdir)
    assert message in str(e.value)
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir()), "nothing half-made"


def test_space_groups_wildcards_bounds_and_scalar_params(previewing_host, workdir):
    from lib_merge.engine.recipe import Recipe
    from lib_merge.optimize.space import SearchSpace
    start = Recipe.from_dict({"method": "add_difference", "models": ["a", "b", "c"], "params": {"alpha": 0.4}})
    space = SearchSpace({"alpha": ["IN0*", "LOW", "M00"], "groups": {"LOW": ["OUT00", "OUT01"]},
                         "bounds": {"M00": [0.2, 0.6], "alpha.LOW": [0, 0.5]}}, start, "sd1")
    assert space.dimension_names[:3] == ["alpha.LOW", "alpha.IN00", "alpha.IN01"]
    assert "alpha.M00" in space.dimension_names and len(space.dimension_names) == 12
    assert {d.name: (d.low, d.high) for d in space.dims}["alpha.M00"] == (0.2, 0.6)
    params = {n: 0.1 for n in space.dimension_names}
    params["alpha.LOW"] = 0.45
    values = space.recipe_for(params).blocks["alpha"]
    assert values[14] == values[15] == 0.45, "a group is one value for its blocks"
    assert values[0] == 0.4 and values[1] == 0.1 and values[13] == 0.1
    with pytest.raises(InputError, match="lack alpha.LOW"):
        space.recipe_for({"alpha.IN00": 0.1})
    ties = Recipe.from_dict({"method": "ties", "models": ["a", "b"], "base": "c"})
    space = SearchSpace({"params": {"density": [0.1, 0.9]}, "lambda": ["M00"]}, ties, "sdxl")
    assert space.dimension_names == ["lambda.M00", "density"]
    assert space.recipe_for({"lambda.M00": 0.5, "density": 0.25}).params["density"] == 0.25


# ------------------------------------------------------------------------------ scores
def test_aggregates_by_hand():
    v, w = [1.0, 4.0, 2.0], [1.0, 1.0, 2.0]
    assert aggregate(v, w, "mean") == pytest.approx((1 + 4 + 4) / 4)
    assert aggregate(v, w, "geometric") == pytest.approx((1 * 4 * 2 * 2) ** 0.25)
    assert aggregate(v, w, "harmonic") == pytest.approx(4 / (1 + 0.25 + 1))
    assert aggregate(v, w, "median") == 2.0
    assert aggregate(v, w, "min") == 1.0
    from lib_merge.optimize.scorers import ScorerError
    with pytest.raises(ScorerError, match="needs scores above 0"):
        aggregate([1.0, -0.5], [1, 1], "geometric")


def test_ensemble_standardises_each_scorer_over_the_run():
    specs = check_scorer_spec([{"name": "python:m:a", "weight": 1}, {"name": "python:m:b", "weight": 3}])
    keys = ["python:m:a", "python:m:b"]
    st = Standardiser(keys)
    st.add({"python:m:a": [0.0, 10.0], "python:m:b": [100.0, 200.0]})
    raw = {"python:m:a": [10.0], "python:m:b": [100.0]}
    st.add(raw)
    # scorer a: values 0, 10, 10 -> mean 20/3, population sd sqrt(200/9); b: 100, 200, 100
    za = (10 - 20 / 3) / math.sqrt(200 / 9)
    zb = (100 - 400 / 3) / math.sqrt(20000 / 9)
    got = per_image_scores(raw, {s["name"]: s["weight"] for s in specs}, st)
    assert got == [pytest.approx((1 * za + 3 * zb) / 4)]
    assert per_image_scores({"python:m:a": [7.0]}, {"python:m:a": 1.0}, st) == [7.0], "one scorer keeps its scale"


# ------------------------------------------------------------------------------ optimisers
def _history(opt_name, n, seed=0, **settings):
    dims = [Dimension(f"x{i}", 0.0, 1.0) for i in range(4)]
    opt = make_optimizer(opt_name, dims, seed, settings)
    history = []
    for k in range(n):
        p = opt.suggest(k, history, [])
        history.append((k, p, -sum((v - 0.3) ** 2 for v in p.values())))
    return history


@pytest.mark.parametrize("name, settings", [("bayes", {"init_points": 3}), ("cma", {"popsize": 4}), ("random", {})])
def test_suggestions_are_a_function_of_the_log(name, settings):
    """A fresh optimiser fed the first k trials suggests what the running one did: resume is exact."""
    full = _history(name, 10, **settings)
    dims = [Dimension(f"x{i}", 0.0, 1.0) for i in range(4)]
    for k in (3, 4, 7):
        fresh = make_optimizer(name, dims, 0, settings)
        assert fresh.suggest(k, full[:k], []) == full[k][1]


def test_cma_waits_for_its_generation_and_bayes_batches_are_distinct():
    dims = [Dimension(f"x{i}", 0.0, 1.0) for i in range(3)]
    cma = make_optimizer("cma", dims, 0, {"popsize": 4})
    first = [cma.suggest(k, [], []) for k in range(4)]
    assert len({tuple(p.values()) for p in first}) == 4
    assert cma.suggest(4, [(0, first[0], 1.0)], first[1:]) is None, "generation 2 waits for generation 1"
    history = _history("bayes", 6, init_points=3)
    bayes = make_optimizer("bayes", dims + [Dimension("x3", 0.0, 1.0)], 0, {"init_points": 3})
    a = bayes.suggest(6, history, [])
    b = bayes.suggest(7, history, [a])
    assert a != b, "the constant liar makes the second suggestion of a batch differ"


@pytest.mark.parametrize("name, settings, message", [
    ("bayes", {"acquisition": "lcb"}, "optimizer.acquisition is 'lcb'"),
    ("bayes", {"sigma0": 0.3}, "Unknown setting(s) for the bayes optimizer: sigma0"),
    ("random", {"kappa": 1}, "it takes none"),
])
def test_optimizer_setting_errors(name, settings, message):
    with pytest.raises(InputError) as e:
        make_optimizer(name, [Dimension("x", 0, 1)], 0, settings)
    assert message in str(e.value)


def test_scorer_module_errors(workdir):
    from lib_merge.optimize.scorers import build_scorers
    with pytest.raises(InputError, match="no module 'nowhere' beside the config"):
        build_scorers(check_scorer_spec("python:nowhere:f"), workdir)
    with pytest.raises(InputError, match="has no function 'missing'"):
        build_scorers(check_scorer_spec("python:scorers:missing"), workdir)
    with pytest.raises(InputError, match="file not found"):
        build_scorers(check_scorer_spec("python:gone.py:f"), workdir)
    (workdir / "extra.py").write_text(textwrap.dedent("""
        def f(images, payloads, params):
            return [len(payloads[0]["prompt"])] * len(images)
    """))
    s, = build_scorers(check_scorer_spec("python:extra.py:f"), workdir)
    assert s.score([object(), object()], [{"prompt": "abc"}] * 2, {}) == [3.0, 3.0]


# ------------------------------------------------------------------------------ Ray
def test_ray_two_actors_every_candidate_once_and_a_dead_actor_is_replaced(workdir, runnable_models):
    pytest.importorskip("ray")
    from lib_merge.host.standalone import StandaloneHost
    (workdir / "killer.py").write_text(textwrap.dedent(f"""
        import os
        from pathlib import Path
        MARK = Path({str(workdir / "killed")!r})

        def score(images, payloads, params):
            # the first trial to reach trial 3's scoring kills its worker process, once
            if len(list(Path({str(workdir)!r}).glob("runs/*/trials.jsonl"))) and not MARK.exists():
                lines = next(Path({str(workdir)!r}).glob("runs/*/trials.jsonl")).read_text().splitlines()
                if len(lines) >= 3:
                    MARK.write_text(str(os.getpid()))
                    os._exit(1)
            return [-sum((params[k] - 0.5) ** 2 for k in params)] * len(images)
    """))
    host = StandaloneHost(runnable_models, workdir / "out", generate=False)
    cfg = config(budget={"trials": 8}, scorer="python:killer:score", optimizer={"name": "bayes", "seed": 2,
                                                                                "init_points": 3})
    log = start_run(cfg, host, root=workdir / "runs", base_dir=workdir)
    lines: list[str] = []
    result = execute(log, host=host, workers=2, echo=lines.append)
    assert result["state"] == "done", lines
    trials = RunLog.open(log.folder).trials()
    assert sorted(r["trial"] for r in trials) == list(range(8)), "each trial exactly once"
    assert all(r["status"] == "ok" for r in trials), [r["error"] for r in trials]
    assert {r["worker"] for r in trials} == {"ray-0", "ray-1"}, "both actors ran candidates"
    assert (workdir / "killed").exists() and any("died" in line and "runs again" in line for line in lines), lines
    params = [tuple(r["params"].values()) for r in trials]
    assert len(set(params)) == 8, "the batch suggestions are distinct (constant liar)"
