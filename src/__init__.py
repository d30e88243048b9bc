"""crf-rnn-3d: dense CRFs as trainable layers for 3D medical images.

Subpackages, in the order the data meets them (imports point down this list's reverse, never up):
  crf_rnn_3d.datasets     readers, preprocessing, phantoms, cache, splits, tf.data
  crf_rnn_3d.lattice_op   the compiled permutohedral-lattice and separable filters (TF ops)
  crf_rnn_3d.crf          the CRF-as-RNN layer and dense-CRF post-processing
  crf_rnn_3d.models       V-Net with an optional CRF head
  crf_rnn_3d.experiments  prepare / train / evaluate / cross-validate / report (Hydra apps)
  crf_rnn_3d.configs      the Hydra configs those apps compose
"""

__version__ = "0.1.0"

# Where the Hydra apps find their configs, installed or in a clone (configs/ is mapped onto the
# package crf_rnn_3d.configs by the build).
CONFIG_MODULE = "crf_rnn_3d.configs"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
