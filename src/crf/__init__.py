"""CRF-as-RNN Keras layer and dense-CRF post-processing (built on crf_rnn_3d.lattice_op).

CrfRnn       the trainable Keras 3 layer, called on [unaries, image] (learn_theta=True: the
             kernel widths are weights too)
mean_field   the functional mean-field inference both build on
crf_rnn_3d.crf.callbacks   ThetaLogger / log_theta_summaries: the learnt widths to TensorBoard
"""

from crf_rnn_3d.crf.functional import mean_field
from crf_rnn_3d.crf.layer import CrfRnn

__all__ = ["CrfRnn", "mean_field"]
