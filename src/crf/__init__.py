"""CRF-as-RNN Keras layer and dense-CRF post-processing (built on src.lattice_op)."""
