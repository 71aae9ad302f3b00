"""Studies in the database, above the space file: URLs and engines with their outage retries
(`storage`), the service's own tables (`registry`), pipelines as stage studies (`pipeline`), the
stage budget (`budget`), the service's exactly-once writes to Optuna's tables (`writes`), the
names of its attributes (`attrs`), and `optuna_private`, the one module that reaches into Optuna's
private API."""
