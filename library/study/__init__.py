"""A whole study from one TOML study file: train every row, sample every checkpoint, judge, report.

`plan.py` reads and checks the study file (every mistake named with its key, all of them at once);
`runner.py` runs it, row by row, resumable at every step (see its docstring). `study.py` is the command.
"""
