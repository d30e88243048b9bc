"""crf-rnn-3d: dense CRFs as trainable layers for 3D medical images."""
