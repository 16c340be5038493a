"""odapi: keep TensorFlow object detectors fresh with Apache Airflow.

`odapi_operators.core` holds the plain-Python stage logic (no Airflow imports); the
Airflow operators, sensors and hooks in this package are thin shells over it, and
`odapi_operators.cli` exposes every stage on the command line.
"""

__version__ = "0.1.0"
