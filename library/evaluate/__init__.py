"""Judging generated images: the rating database, the rating page, metrics, a classifier and the report."""
