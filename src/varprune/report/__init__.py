"""Report: tables, figures, the HTML pages and the analysis figures, from results files. It never trains.

* tables.py     Markdown and CSV tables of prune.json / report.json documents
* figures.py    the metric against sparsity (runs, study bands)
* results.py    prune.json and report.json: written and read back, checked
* pages.py      the HTML pages (html.py: the self-contained page writer)
* analysis_figures.py   histograms, variance over training, sensitivity, flatness
"""
