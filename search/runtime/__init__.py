"""Workers, above `db`: the worker process (`worker`), its stage runner (`stages`), how a trial
ended (`outcome`), the seam to the trainer (`objective`), heartbeats and the reaper (`beat`,
`retry`), the sampler and pruner (`strategy`, `algorithms`, `startup`), and local worker
processes for `hpo run` (`local`). Nothing here renders results."""
