"""Annotation exports to TFRecords: finding exports, parsing formats, images, records."""
