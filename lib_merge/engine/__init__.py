"""The merge engine: recipe (recipe.py) --plan (plan.py)--> tasks --execute (execute.py)--> a sink (sinks.py);
merge.py runs the whole merge, live.py keeps what a live model needs for fast re-merges."""
