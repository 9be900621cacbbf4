"""CT data: reading and writing (local + S3), preprocessing, DRR rendering, phantoms.

Importing this package imports neither Ray nor MLflow.
"""
