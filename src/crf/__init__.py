"""CRF-as-RNN Keras layer and dense-CRF post-processing (built on src.lattice_op).

CrfRnn       the trainable Keras 3 layer, called on [unaries, image]
mean_field   the functional mean-field inference both build on
"""

from src.crf.functional import mean_field
from src.crf.layer import CrfRnn

__all__ = ["CrfRnn", "mean_field"]
