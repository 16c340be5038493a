"""Annotation export parsers. Each yields canonical `ImageRecord`s and reports rejections."""
