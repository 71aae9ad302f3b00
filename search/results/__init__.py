"""What a search produced, read from `db`, never from a running worker: each stage's standing and
the winner (`best`), the live picture of a study (`snapshot`, `status`, `live`, `summary`), the HTML
report (`report`) and serving the winner (`serve`)."""
