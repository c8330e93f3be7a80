"""The GPU campaign's Python, beside .ci/gpu (the bash script that runs its stages under a time budget): campaign.py
is stage e (FER2013 trained within the stage's seconds) and the final summary and tables; static.py compiles the
hand-written kernels for an H100 without a GPU and reads their registers, spills and occupancy. Run them from the
repo root as `python -m tools.campaign` and `python -m tools.static`; bench.py, at the root, times the kernels.
"""
