"""Real services on loopback (PostgreSQL, moto's S3 server, `mlflow server`, a Dask cluster),
started by the test suite and by the benchmarks alike. Not used by the pipeline itself."""
