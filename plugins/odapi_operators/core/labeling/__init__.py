"""Closing the labeling loop: pre-annotation and active learning."""
