"""AutoMBW: unattended optimisation of a merge's block weights (docs/AUTOMBW.md).

config.py (the run's one config file) -> space.py (the searched dimensions <-> recipes) -> optimizers.py
(ask/tell, the log is the state) -> trial.py (merge into the live model, generate the payloads, score) ->
runlog.py (the run folder: trials.jsonl journal, best.json, images) -> runner.py (the loop: budget, early
stop, holdout, parallel workers on Ray via workers.py) -> jobs.py (background runs for the tab and the API).
payloads.py and scorers.py hold what a trial is scored on and with; report.py draws the plots."""
