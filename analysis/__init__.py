"""Analysis of esdbs experiment directories: the paper's numbers and the reproduction report.

``analysis.report.build_report(experiment_dir, out_dir=None) -> dict`` writes ``report.md``,
``report.html`` and PNG figures; ``analysis.paper_numbers`` holds the paper's published tables.
Nothing here imports Ray or the training code at import time.
"""
