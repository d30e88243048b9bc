"""Pieces both benchmark scripts share (scripts/bench_lattice.py, scripts/bench_crf.py): the peak
memory probe (:mod:`.memory`) and the one pydensecrf2 driver (:mod:`.pydensecrf`). Their inputs,
the benchmark phantoms, are in :mod:`crf_rnn_3d.datasets.phantoms`. pydensecrf2 is an optional,
benchmark-only dependency (requirements-bench.txt), imported only when the driver runs."""
