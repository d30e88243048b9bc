"""Hydra configs of crf-rnn-3d, shipped inside the package (config_path pkg://crf_rnn_3d.configs)."""
