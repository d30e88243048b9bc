"""Readers, preprocessing, synthetic phantoms, splits and tf.data pipelines."""
