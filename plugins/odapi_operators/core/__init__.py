"""Stage logic that never imports Airflow: one module per stage plus shared helpers."""
