"""Analysis of esdbs experiment directories: the paper's numbers and the reproduction report.

``esdbs_ray.analysis.report.build_report(experiment, out_dir=None) -> dict`` writes ``report.md``,
``report.html`` and PNG figures from a local or remote (``pyarrow.fs``) experiment;
``paper_numbers`` holds the paper's published tables.  By job: ``experiment`` loads the artifacts,
``claims`` judges the paper's claims, ``sections`` writes the report's parts, ``render`` turns them
into Markdown and HTML, ``figures`` draws.  Nothing here imports Ray or the training code at import
time (tests/test_report.py checks), so the report runs wherever the results are.

The repository's top-level ``analysis/`` folder holds committed results (``analysis/results/``), not code.
"""
