"""Engine: the run configuration, run folders, the training loop, data parallelism, methods, the pruning
sweep, studies, tuning, analysis, export and the demos. It puts the layers below together; the commands call it.
"""
