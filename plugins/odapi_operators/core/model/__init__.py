"""TensorFlow models: TF-Vision configs, training, detectors, SavedModel export."""
