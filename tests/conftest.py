"""Shared test set-up: quiet TensorFlow logs, repository root importable (see pyproject)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
