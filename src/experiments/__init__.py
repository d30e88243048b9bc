"""Entry points: prepare, train, evaluate, cross-validate, report."""
