"""The stages' runs: open the tracked run, call the training loop or the metrics, write the
stage's outputs, log. One module per stage, so a stage imports only what it runs."""
